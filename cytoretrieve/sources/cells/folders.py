"""Plain class folders: `<root>/<class name>/<image>`; the label is the folder name exactly as given (spaces kept).

Only images directly inside each class folder count, so a wrapper folder around a dataset is not mistaken for a
single class (the error then points at the nested root instead).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cells.labels import LabelMap
from cytoretrieve.sources.cells.record import CellRecord, images_in, relative_id, visible_dirs


def class_folders(root: Path) -> dict[str, list[Path]]:
    """Class name -> its images, for each visible sub-folder of `root` that holds images directly."""
    found = {}
    for folder in visible_dirs(root):
        images = images_in(folder)
        if images:
            found[folder.name] = images
    return found


def looks_like_folders(root: Path) -> bool:
    """At least one sub-folder of `root` holds images."""
    return any(images_in(folder) for folder in visible_dirs(root))


def read_folders(root: Path, labels: LabelMap | None = None) -> list[CellRecord]:
    """One record per image in each class folder; binary from `labels` when given, else None."""
    loose = images_in(root)
    classes = class_folders(root)
    if not classes:
        what = f"{len(loose)} loose images but " if loose else ""
        raise CytoError(f"{root} has {what}no class folders with images; put the images in one folder per class")
    if loose:
        warnings.warn(f"{root} has {len(loose)} images outside the class folders; they are not read", stacklevel=3)
    return [
        CellRecord(relative_id(path, root), str(path), name, labels.binary_of(name) if labels else None)
        for name, images in classes.items()
        for path in images
    ]


def plain_label_map(name: str, records: list[CellRecord]) -> LabelMap | None:
    """A label map for labels without a given map: classes sorted, binary unknown, long name = the label."""
    classes = sorted({r.label for r in records if r.label is not None})
    if not classes:
        return None
    return LabelMap(name=name, classes=tuple(classes), binary={c: None for c in classes}, names={c: c for c in classes})
