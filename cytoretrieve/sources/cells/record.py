"""The row and set types every reader returns, and the file-listing helpers they share.

Readers only list files: they never open images (a corrupt image is the embed job's business: it skips and
counts them).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cytoretrieve.errors import CytoError

if TYPE_CHECKING:
    from cytoretrieve.sources.cells.labels import LabelMap

IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff")
"""Image file endings accepted by every reader, compared case-insensitively."""


@dataclass(frozen=True)
class CellRecord:
    """One cell image. `id` is the posix path relative to the dataset root, so it is stable across machines."""

    id: str
    path: str
    label: str | None
    binary: int | None
    group: str | None = None


@dataclass
class CellDataset:
    """A listed dataset: its records sorted by id, and the label map that gives codes their names and binary values."""

    name: str
    layout: str
    root: Path
    records: list[CellRecord]
    labels: LabelMap | None


def is_image(name: str) -> bool:
    """True for a visible file name with an accepted image ending."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders of `folder` that are not hidden, sorted by name."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise CytoError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]


def images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not below it), hidden ones excluded, sorted by name."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise CytoError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return [Path(e.path) for e in entries if is_image(e.name) and e.is_file()]


def walk_images(folder: Path) -> Iterator[Path]:
    """Every image below `folder`, skipping hidden files and folders."""
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_image(name):
                yield Path(top) / name


def has_any_image(folder: Path) -> bool:
    """True as soon as one image is found anywhere below `folder`."""
    return next(walk_images(folder), None) is not None


def relative_id(path: Path, root: Path) -> str:
    """The record id of `path`: its posix path relative to `root`."""
    return path.relative_to(root).as_posix()


def slug(text: str) -> str:
    """A lower-case name made of [a-z0-9_] ("CRIC crops 100px" -> "cric_crops_100px")."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "dataset"


def accepted_endings() -> str:
    """The accepted image endings, for error messages."""
    return " ".join(IMAGE_SUFFIXES)


def finish(records: list[CellRecord], source: Path) -> list[CellRecord]:
    """Sort records by id, and refuse an empty list or duplicate ids (either would make row ids meaningless)."""
    if not records:
        raise CytoError(f"no images found in {source} (accepted endings: {accepted_endings()})")
    records = sorted(records, key=lambda r: r.id)
    dups = sorted({a.id for a, b in zip(records, records[1:]) if a.id == b.id})
    if dups:
        shown = ", ".join(dups[:5]) + (f" and {len(dups) - 5} more" if len(dups) > 5 else "")
        raise CytoError(f"{source} lists the same image more than once: {shown}; remove the repeated rows")
    return records



def find_class_folders(root: Path, folder_codes: dict[str, str]) -> dict[str, Path]:
    """Class code -> folder for the known class folders under `root` (`folder_codes` keys are lower-case names)."""
    found: dict[str, Path] = {}
    for folder in visible_dirs(root):
        code = folder_codes.get(folder.name.lower())
        if code and code not in found:
            found[code] = folder
    return found


def require_class_folders(root: Path, folder_codes: dict[str, str], dataset: str, classes: tuple[str, ...]) -> dict[str, Path]:
    """`find_class_folders`, where none at all is a CytoError and a missing class a warning (the rest is read)."""
    found = find_class_folders(root, folder_codes)
    if not found:
        raise CytoError(f"no {dataset} class folders in {root} (expected {', '.join(dict.fromkeys(folder_codes))})")
    missing = [code for code in classes if code not in found]
    if missing:
        warnings.warn(f"{dataset} root {root} has no folder for {', '.join(missing)}; reading the other classes", stacklevel=3)
    return found
