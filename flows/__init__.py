"""Orchestration: the Prefect flows and tasks, MLflow runs and registry, the command line."""
