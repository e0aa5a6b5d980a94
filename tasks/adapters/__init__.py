"""Adapters to the tracking and tuning services (MLflow, Optuna) and the MLflow model packaging; no Prefect."""
