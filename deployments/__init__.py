"""How the flows are deployed and run: prefect.yaml (deployments on a work pool) and stack.py (the shared
backends those workers need, started on one machine by `soups stack up`)."""
