"""Dataset sources (NIH ChestX-ray14, CheXpert, synthetic phantoms) into one validated table,
then patient-split, sharded Parquet with a manifest, and the tf.data reader over it.
"""

# This folder sits at the top of the repository but is the package chestxpert.datasets; imported
# under its bare name it would shadow the PyPI package of that name (and be a second copy).
if __name__ != "chestxpert.datasets":
    raise ImportError(f"{__file__} is the package chestxpert.datasets; import it by that name")
