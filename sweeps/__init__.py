"""Sweep specs (YAML) to Ray Tune sweeps with OptunaSearch + ASHA, MLflow streaming and resume."""
