"""CSV manifests: one row per image, columns `path` (or `file`), `label` and optionally `group` (slide or patient id).

Paths are relative to the CSV's folder, or absolute. A manifest without a `label` column is an unlabelled set
(fine for similar-cell search); an empty label cell is an unlabelled row.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cells.labels import LabelMap
from cytoretrieve.sources.cells.record import IMAGE_SUFFIXES, CellRecord, accepted_endings

PATH_COLUMNS = ("path", "file")


def _shown(items: list[str]) -> str:
    """Up to five items, then how many more."""
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _record_id(path: Path, root: Path) -> str:
    """Path relative to the manifest folder, or the absolute posix path when it lies outside it."""
    rel = Path(os.path.relpath(path, root))
    return path.as_posix() if rel.parts[:1] == (os.pardir,) else rel.as_posix()


def read_manifest(csv_path: Path, labels: LabelMap | None = None) -> list[CellRecord]:
    """Read the rows of `csv_path`; refuse missing columns, missing files and non-image files (listing up to 5)."""
    root = csv_path.parent
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CytoError(f"cannot read manifest {csv_path}: {exc}") from None
    if not rows:
        raise CytoError(f"manifest {csv_path} is empty; it needs a header row path,label[,group]")
    header = [h.strip().lower() for h in rows[0]]
    path_col = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    if path_col is None:
        raise CytoError(
            f"manifest {csv_path} has no 'path' (or 'file') column; columns found: {', '.join(header) or 'none'}"
        )
    label_col = header.index("label") if "label" in header else None
    group_col = header.index("group") if "group" in header else None

    records: list[CellRecord] = []
    missing: list[str] = []
    not_images: list[str] = []
    for row_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        row = row + [""] * (len(header) - len(row))
        given = row[path_col].strip().replace("\\", "/")
        if not given:
            raise CytoError(f"manifest {csv_path} row {row_no}: empty path")
        path = Path(os.path.normpath(root / Path(given).expanduser()))
        if path.suffix.lower() not in IMAGE_SUFFIXES:  # listed explicitly, so hidden names are fine here
            not_images.append(given)
            continue
        if not path.is_file():
            missing.append(given)
            continue
        label = row[label_col].strip() or None if label_col is not None else None
        group = row[group_col].strip() or None if group_col is not None else None
        binary = labels.binary_of(label) if labels else None
        records.append(CellRecord(_record_id(path, root), str(path), label, binary, group))
    if not_images:
        raise CytoError(
            f"manifest {csv_path}: {len(not_images)} rows name files that are not images ({_shown(not_images)}); "
            f"accepted endings: {accepted_endings()}"
        )
    if missing:
        raise CytoError(
            f"manifest {csv_path}: {len(missing)} rows point to missing files ({_shown(missing)}); "
            f"paths are relative to {root}"
        )
    return records
