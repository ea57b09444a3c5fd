"""Readers for cell-image datasets (Herlev, SIPaKMeD, plain class folders, CSV manifests), label maps, and downloads.

Everything here lists files and reads small text files only (standard library): no images are opened and nothing
heavy is imported, so the CLI stays fast.
"""

from __future__ import annotations

from cytoretrieve.sources.cells.detect import LAYOUTS, open_dataset
from cytoretrieve.sources.cells.download import SOURCES, download_dataset
from cytoretrieve.sources.cells.herlev import mask_path
from cytoretrieve.sources.cells.labels import HERLEV, SIPAKMED, LabelMap, load_label_map
from cytoretrieve.sources.cells.record import IMAGE_SUFFIXES, CellDataset, CellRecord

__all__ = [
    "CellDataset",
    "CellRecord",
    "HERLEV",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "LabelMap",
    "SIPAKMED",
    "SOURCES",
    "download_dataset",
    "load_label_map",
    "mask_path",
    "open_dataset",
]
