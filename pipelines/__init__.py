"""Stages and their machinery: where torch meets data, DeepSpeed and checkpoints (knows nothing of Prefect)."""
