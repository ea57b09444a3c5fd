"""`open_dataset`: pick the layout of a source (or take the forced one), list its records, attach the label map."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cells.folders import looks_like_folders, plain_label_map, read_folders
from cytoretrieve.sources.cells.herlev import looks_like_herlev, read_herlev
from cytoretrieve.sources.cells.labels import BETHESDA, HERLEV, SIPAKMED, LabelMap, load_label_map
from cytoretrieve.sources.cells.manifest import read_manifest
from cytoretrieve.sources.cells.record import (
    CellDataset,
    accepted_endings,
    finish,
    has_any_image,
    images_in,
    slug,
    visible_dirs,
)
from cytoretrieve.sources.cells.sipakmed import looks_like_sipakmed, read_sipakmed

LAYOUTS: tuple[str, ...] = ("auto", "herlev", "sipakmed", "sipakmed-full", "folders", "manifest")
"""Values accepted by `open_dataset(layout=...)`. `sipakmed-full` reads the multi-cell images instead of the crops."""

AUTO_ORDER = ("herlev", "sipakmed", "folders", "manifest")
"""Auto-detection order for a folder (a .csv source is always a manifest)."""

MANIFEST_NAME = "manifest.csv"

DETECTORS: dict[str, Callable[[Path], bool]] = {
    "herlev": looks_like_herlev,
    "sipakmed": looks_like_sipakmed,
    "folders": looks_like_folders,
    "manifest": lambda root: (root / MANIFEST_NAME).is_file(),
}


def find_nested(
    root: Path, layouts: tuple[str, ...] = ("herlev", "sipakmed", "folders"), depth: int = 3
) -> tuple[Path, str] | None:
    """The shallowest folder strictly below `root` (at most `depth` levels) that matches one of `layouts`."""
    queue = deque((d, 1) for d in visible_dirs(root))
    while queue:
        folder, level = queue.popleft()
        for layout in layouts:
            if DETECTORS[layout](folder):
                return folder, layout
        if level < depth:
            queue.extend((d, level + 1) for d in visible_dirs(folder))
    return None


def _detect(root: Path) -> str:
    """The first layout of AUTO_ORDER that `root` matches, or a CytoError saying what was tried and what to do."""
    for layout in AUTO_ORDER:
        if DETECTORS[layout](root):
            return layout
    if not has_any_image(root):
        raise CytoError(f"no images found under {root} (accepted endings: {accepted_endings()})")
    tried = ", ".join(AUTO_ORDER)
    nested = find_nested(root)
    if nested:
        raise CytoError(
            f"unrecognised layout at {root} (tried {tried}); did you mean {nested[0]} ({nested[1]} layout)?"
        )
    loose = len(images_in(root))
    what = f"it holds {loose} loose images but no class folders" if loose else "its images sit too deep"
    raise CytoError(
        f"unrecognised layout at {root} (tried {tried}): {what}; "
        f"put the images in one folder per class, or list them in a CSV manifest (path,label) and pass that file"
    )


def _dataset_name(layout: str, root: Path, source: Path) -> str:
    if layout in ("herlev", "sipakmed", "sipakmed-full"):
        return layout.split("-")[0]
    if layout == "manifest" and source.stem.lower() != "manifest":
        return slug(source.stem)
    return slug(root.name)


def open_dataset(source: str | Path, layout: str = "auto", label_map: str | Path | None = None) -> CellDataset:
    """List the cell images of a dataset folder (herlev, sipakmed, plain class folders) or a CSV manifest.

    `layout` forces a reader instead of auto-detection; `label_map` (JSON or CSV file) replaces the built-in
    Herlev / SIPaKMeD mapping or gives plain folders and manifests their binary labels. Images are listed, not opened.
    """
    if layout not in LAYOUTS:
        raise CytoError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    src = Path(source).expanduser()
    if not src.exists():
        raise CytoError(f"{src} does not exist; give a dataset folder or a CSV manifest")
    src = src.resolve()
    given = load_label_map(label_map) if label_map is not None else None

    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise CytoError(f"{src} is a file; give a dataset folder or a CSV manifest (.csv)")
        if layout not in ("auto", "manifest"):
            raise CytoError(f"layout {layout!r} needs a folder, but {src} is a file; use `layout` manifest or auto")
        layout, root, csv_path = "manifest", src.parent, src
    else:
        root = src
        if layout == "auto":
            layout = _detect(root)
        elif layout != "manifest" and not has_any_image(root):
            raise CytoError(f"no images found under {root} (accepted endings: {accepted_endings()})")
        csv_path = root / MANIFEST_NAME
        if layout == "manifest" and not csv_path.is_file():
            raise CytoError(f"no {MANIFEST_NAME} in {root}; give the manifest CSV file itself")

    if layout == "herlev":
        records = read_herlev(root, given)
        labels: LabelMap | None = given or HERLEV
    elif layout in ("sipakmed", "sipakmed-full"):
        records = read_sipakmed(root, given, full=layout == "sipakmed-full")
        labels = given or SIPAKMED
    elif layout == "folders":
        records = read_folders(root, given)
        labels = given
    else:
        records = read_manifest(csv_path, given)
        labels = given
    source_for_errors = csv_path if layout == "manifest" else root
    records = finish(records, source_for_errors)
    name = _dataset_name(layout, root, source_for_errors)
    found = {r.label for r in records if r.label is not None}
    if labels is None and found and found <= set(BETHESDA.classes):  # CRIC Cervix and other Bethesda-named sets
        classes = tuple(c for c in BETHESDA.classes if c in found)  # the categories present, in Bethesda order
        labels = LabelMap("bethesda", classes, {c: BETHESDA.binary[c] for c in classes},
                          {c: BETHESDA.names[c] for c in classes})
        records = [replace(r, binary=BETHESDA.binary_of(r.label)) for r in records]
    if labels is None:
        labels = plain_label_map(name, records)
    else:
        labels.check_covers((r.label for r in records), str(source_for_errors))
    return CellDataset(name=name, layout=layout, root=root, records=records, labels=labels)
