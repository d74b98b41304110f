"""Sweep specs (YAML) to Ray Tune sweeps with OptunaSearch + ASHA, MLflow streaming and resume."""

# This folder sits at the top of the repository but is the package chestxpert.sweeps; imported
# under its bare name it would shadow the PyPI package of that name (and be a second copy).
if __name__ != "chestxpert.sweeps":
    raise ImportError(f"{__file__} is the package chestxpert.sweeps; import it by that name")
