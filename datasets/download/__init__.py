"""Fetch the NIH ChestX-ray14 data onto this machine: the Kaggle "NIH sample" through the Kaggle
client, or the full release from NIH's own archive links, resumable, checked, and unpacked into
the layout `datasets.nih.read_nih` reads.

The modules: `kaggle` (the sample) with `credentials` (Kaggle's), `nih_release` (the full
release) with `nih_files` (NIH's file list), `http` (resumable downloads), `archives` (checking
and unpacking NIH's tar.gz archives) and `messages` (what every failure tells the user).
"""

from chestxpert.datasets.download.archives import unpack_nih_archive, verify_archive
from chestxpert.datasets.download.credentials import KaggleCredentials, kaggle_credentials
from chestxpert.datasets.download.http import fetch
from chestxpert.datasets.download.kaggle import download_nih_sample, unpack_kaggle_sample
from chestxpert.datasets.download.nih_files import NIH_BOX_FOLDER, NIH_FILES, NihFile
from chestxpert.datasets.download.nih_release import download_nih_full

__all__ = [
    "NIH_BOX_FOLDER",
    "NIH_FILES",
    "KaggleCredentials",
    "NihFile",
    "download_nih_full",
    "download_nih_sample",
    "fetch",
    "kaggle_credentials",
    "unpack_kaggle_sample",
    "unpack_nih_archive",
    "verify_archive",
]
