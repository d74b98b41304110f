"""Service discovery and the local stack: where Ray, MLflow and object storage are; starting them.

`chestxpert.cluster.endpoints.resolve` is the one resolver every other package uses.
"""

# This folder sits at the top of the repository but is the package chestxpert.cluster; imported
# under its bare name it would shadow the PyPI package of that name (and be a second copy).
if __name__ != "chestxpert.cluster":
    raise ImportError(f"{__file__} is the package chestxpert.cluster; import it by that name")
