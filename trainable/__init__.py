"""The Ray Tune trial: backbone registry, weighted loss, full-validation metrics, checkpoints."""

# This folder sits at the top of the repository but is the package chestxpert.trainable; imported
# under its bare name it would shadow the PyPI package of that name (and be a second copy).
if __name__ != "chestxpert.trainable":
    raise ImportError(f"{__file__} is the package chestxpert.trainable; import it by that name")
