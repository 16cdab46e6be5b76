"""The code MLflow runs to load a registered version (models from code; see flows/generator.py)."""

import mlflow

from flows.generator import LaLoRAGenerator

mlflow.models.set_model(LaLoRAGenerator())
