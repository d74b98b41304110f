"""The files of the NIH ChestX-ray14 release: where NIH serves each one and its MD5, or that it
has no direct link and must be fetched by hand from NIH's Box folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from chestxpert.datasets.nih import BBOX_FILE, LABEL_FILES, OFFICIAL_LISTS


@dataclass(frozen=True)
class NihFile:
    """One file of the NIH release: its name in the data folder, where NIH serves it, its MD5.

    `url` is None where NIH publishes no direct link (the file must be fetched by hand from
    NIH_BOX_FOLDER); `md5` is None where NIH publishes no checksum.
    """

    name: str
    url: str | None
    md5: str | None = None


NIH_BOX_FOLDER = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_LABEL_FILE = LABEL_FILES[0]  # Data_Entry_2017_v2020.csv, the revision read first
# The 12 image archives: links as in NIH's own batch_download_zips.py (in NIH_BOX_FOLDER), which
# saves them as images_01.tar.gz … images_12.tar.gz; the web folder names them images_001.tar.gz …,
# the name used here. MD5s as NIH's FAQ_CHESTXRAY.pdf (same folder, question Q07) lists them.
# The label file, box file and split lists have no direct link in NIH's script or FAQ, and a Box
# file page is not a download URL: rather than guess one, they stay None and must be fetched by
# hand (download_nih_full says so and which ones are missing).
NIH_FILES: tuple[NihFile, ...] = (
    NihFile(
        "images_001.tar.gz",
        "https://nihcc.box.com/shared/static/vfk49d74nhbxq3nqjg0900w5nvkorp5c.gz",
        "fe8ed0a6961412fddcbb3603c11b3698",
    ),
    NihFile(
        "images_002.tar.gz",
        "https://nihcc.box.com/shared/static/i28rlmbvmfjbl8p2n3ril0pptcmcu9d1.gz",
        "ab07a2d7cbe6f65ddd97b4ed7bde10bf",
    ),
    NihFile(
        "images_003.tar.gz",
        "https://nihcc.box.com/shared/static/f1t00wrtdk94satdfb9olcolqx20z2jp.gz",
        "2301d03bde4c246388bad3876965d574",
    ),
    NihFile(
        "images_004.tar.gz",
        "https://nihcc.box.com/shared/static/0aowwzs5lhjrceb3qp67ahp0rd1l1etg.gz",
        "9f1b7f5aae01b13f4bc8e2c44a4b8ef6",
    ),
    NihFile(
        "images_005.tar.gz",
        "https://nihcc.box.com/shared/static/v5e3goj22zr6h8tzualxfsqlqaygfbsn.gz",
        "1861f3cd0ef7734df8104f2b0309023b",
    ),
    NihFile(
        "images_006.tar.gz",
        "https://nihcc.box.com/shared/static/asi7ikud9jwnkrnkj99jnpfkjdes7l6l.gz",
        "456b53a8b351afd92a35bc41444c58c8",
    ),
    NihFile(
        "images_007.tar.gz",
        "https://nihcc.box.com/shared/static/jn1b4mw4n6lnh74ovmcjb8y48h8xj07n.gz",
        "1075121ea20a137b87f290d6a4a5965e",
    ),
    NihFile(
        "images_008.tar.gz",
        "https://nihcc.box.com/shared/static/tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j.gz",
        "b61f34cec3aa69f295fbb593cbd9d443",
    ),
    NihFile(
        "images_009.tar.gz",
        "https://nihcc.box.com/shared/static/upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj.gz",
        "442a3caa61ae9b64e61c561294d1e183",
    ),
    NihFile(
        "images_010.tar.gz",
        "https://nihcc.box.com/shared/static/l6nilvfa9cg3s28tqv1qc1olm3gnz54p.gz",
        "09ec81c4c31e32858ad8cf965c494b74",
    ),
    NihFile(
        "images_011.tar.gz",
        "https://nihcc.box.com/shared/static/hhq8fkdgvcari67vfhs7ppg2w6ni4jze.gz",
        "499aefc67207a5a97692424cf5dbeed5",
    ),
    NihFile(
        "images_012.tar.gz",
        "https://nihcc.box.com/shared/static/ioqwiy20ihqwyr8pf4c24eazhh281pbu.gz",
        "dc9fda1757c2de0032b63347a7d2895c",
    ),
    NihFile(NIH_LABEL_FILE, None),
    NihFile(BBOX_FILE, None),
    NihFile(OFFICIAL_LISTS["train_val"], None),
    NihFile(OFFICIAL_LISTS["test"], None),
)
