"""Herlev (DTU/Herlev smear2005): seven class folders of single-cell images.

The original release keeps each cell as `<stem>.BMP` with its segmentation mask `<stem>-d.bmp` beside it; masks are
not cells. Processed copies (such as the letterboxed JPEG set) keep the folders and drop the masks.
"""

from __future__ import annotations

from pathlib import Path

from cytoretrieve.sources.cells.labels import HERLEV, LabelMap
from cytoretrieve.sources.cells.record import (
    IMAGE_SUFFIXES,
    CellRecord,
    find_class_folders,
    images_in,
    relative_id,
    require_class_folders,
)

HERLEV_FOLDERS: dict[str, str] = {
    "normal_superficiel": "NS",
    "normal_intermediate": "NI",
    "normal_columnar": "NC",
    "light_dysplastic": "LD",
    "moderate_dysplastic": "MD",
    "severe_dysplastic": "SD",
    "carcinoma_in_situ": "CIS",
}
"""Folder name (as released, French spelling included) -> class code."""

_ALIASES = {"normal_superficial": "NS"}  # the English spelling some copies use
MIN_FOLDERS = 4  # this many of the 7 class folders make a root Herlev-like


_FOLDER_CODES = {**HERLEV_FOLDERS, **_ALIASES}


def class_folders(root: Path) -> dict[str, Path]:
    """Herlev class code -> folder, for the class folders present at `root`."""
    return find_class_folders(root, _FOLDER_CODES)


def looks_like_herlev(root: Path) -> bool:
    """At least MIN_FOLDERS of the seven Herlev class folders sit directly under `root`."""
    return len(class_folders(root)) >= MIN_FOLDERS


def is_mask(path: Path) -> bool:
    """A Herlev segmentation mask: `<stem>-d.<ext>`."""
    return path.stem.lower().endswith("-d")


def read_herlev(root: Path, labels: LabelMap | None = None) -> list[CellRecord]:
    """List the cells of each class folder (masks skipped): label = class code, binary from `labels` or HERLEV."""
    labels = labels or HERLEV
    folders = require_class_folders(root, _FOLDER_CODES, "Herlev", HERLEV.classes)
    records = []
    for code, folder in folders.items():
        for path in images_in(folder):
            if not is_mask(path):
                records.append(CellRecord(relative_id(path, root), str(path), code, labels.binary_of(code)))
    return records


def mask_path(record: CellRecord | str | Path) -> Path | None:
    """The segmentation mask beside a Herlev cell (`<stem>-d.bmp`), or None when there is none (processed copies)."""
    path = Path(record.path if isinstance(record, CellRecord) else record)
    endings = [path.suffix] + [s for suffix in IMAGE_SUFFIXES for s in (suffix, suffix.upper())]
    for dash in ("-d", "-D"):
        for ending in dict.fromkeys(endings):
            candidate = path.with_name(f"{path.stem}{dash}{ending}")
            if candidate.is_file():
                return candidate
    return None
