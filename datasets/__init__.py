"""Dataset sources (NIH ChestX-ray14, CheXpert, synthetic phantoms) into one validated table,
then patient-split, sharded Parquet with a manifest, and the tf.data reader over it.
"""
