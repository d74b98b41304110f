"""The final job: retrain the best config, evaluate, Grad-CAM, report, registry; pull, predict."""

# This folder sits at the top of the repository but is the package chestxpert.results; imported
# under its bare name it would shadow the PyPI package of that name (and be a second copy).
if __name__ != "chestxpert.results":
    raise ImportError(f"{__file__} is the package chestxpert.results; import it by that name")
