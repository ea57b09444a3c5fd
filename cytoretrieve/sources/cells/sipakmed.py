"""SIPaKMeD (Plissiti et al. 2018): five `im_<Class>` folders.

Each class folder holds the full multi-cell images (`NNN.bmp`) and a `CROPPED/` folder with the single-cell crops
(`NNN_MM.bmp`), plus `.dat` boundary files that are not images. A common redistribution nests each class twice
(`im_Dyskeratotic/im_Dyskeratotic/CROPPED/001_01.bmp`); both shapes are read. The class always comes from the `im_*`
folder. `group` is the full image a crop was cut from ("im_Dyskeratotic/001"), so splits can keep a cluster together.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cells.labels import SIPAKMED, LabelMap
from cytoretrieve.sources.cells.record import (
    CellRecord,
    find_class_folders,
    images_in,
    relative_id,
    require_class_folders,
    visible_dirs,
)

FOLDER_NAMES: dict[str, str] = {
    "im_Superficial-Intermediate": "SI",
    "im_Parabasal": "P",
    "im_Koilocytotic": "K",
    "im_Dyskeratotic": "D",
    "im_Metaplastic": "M",
}
"""Class folder name as released -> class code."""

SIPAKMED_FOLDERS: dict[str, str] = {name.lower(): code for name, code in FOLDER_NAMES.items()}
"""Lower-cased class folder name -> class code (folder names are matched case-insensitively)."""

_PARENT = re.compile(r"^(\d+)(?:_\d+)?$")


def class_folders(root: Path) -> dict[str, Path]:
    """SIPaKMeD class code -> `im_*` folder, for the class folders present at `root`."""
    return find_class_folders(root, SIPAKMED_FOLDERS)


def looks_like_sipakmed(root: Path) -> bool:
    """At least one `im_<Class>` folder sits directly under `root` (the names are specific enough)."""
    return bool(class_folders(root))


def _levels(folder: Path) -> list[Path]:
    """The class folder, plus its same-named inner folder in the doubly nested redistribution."""
    inner = [d for d in visible_dirs(folder) if d.name.lower() == folder.name.lower()]
    return [folder, *inner]


def _cropped(folder: Path) -> list[Path]:
    return [d for d in visible_dirs(folder) if d.name.lower() == "cropped"]


def _group(folder: Path, path: Path) -> str | None:
    match = _PARENT.match(path.stem)
    return f"{folder.name}/{match.group(1)}" if match else None


def read_sipakmed(root: Path, labels: LabelMap | None = None, *, full: bool = False) -> list[CellRecord]:
    """List the cropped cells (or, with `full`, the multi-cell images beside CROPPED) of each `im_*` class folder."""
    labels = labels or SIPAKMED
    folders = require_class_folders(root, SIPAKMED_FOLDERS, "SIPaKMeD", SIPAKMED.classes)
    records = []
    without_crops = []
    for code, folder in folders.items():
        levels = _levels(folder)
        dirs = levels if full else [c for level in levels for c in _cropped(level)]
        if not dirs:
            without_crops.append(folder.name)
        for d in dirs:
            for path in images_in(d):
                records.append(
                    CellRecord(relative_id(path, root), str(path), code, labels.binary_of(code), _group(folder, path))
                )
    if not full and without_crops and not records:
        raise CytoError(
            f"SIPaKMeD root {root} has no CROPPED folder in {', '.join(without_crops)}; "
            "if the crops sit directly in the im_* folders use `layout` folders with a `label_map`"
        )
    if not full and without_crops:
        warnings.warn(
            f"SIPaKMeD root {root}: no CROPPED folder in {', '.join(without_crops)}; those classes are empty",
            stacklevel=3,
        )
    return records
