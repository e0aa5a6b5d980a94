"""Prefect tasks (one module per stage: trial, cooking, promotion, pretraining); `tasks.adapters` holds the
MLflow and Optuna code that is not a task."""
