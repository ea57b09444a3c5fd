"""Patch feature files in: a folder of per-slide `.h5` files (CLAM or TRIDENT layout) -> tile records + vectors.

Both tools write one file per slide, named after the slide, holding `features` (N, d) and `coords` (N, 2: level-0
x, y of each patch's top-left corner). Where they differ is the patch geometry:

- TRIDENT (`trident.IO.coords_to_h5`, `WSI.extract_features`): the attributes of `coords` carry `patch_size` (px at
  the target magnification), `patch_size_level0`, `level0_magnification`, `target_magnification`, `overlap`; the
  attributes of `features` carry `encoder` (e.g. `uni_v1`) and `name`.
- CLAM (`extract_features_fp.py`): the feature file (`h5_files/<slide>.h5`) has no attributes; the geometry is in
  the attributes of `coords` in the patches file (`patches/<slide>.h5`: `patch_size`, `patch_level`, `downsample`,
  ...), found through `patches` (or in the feature file itself, as `export h5 --layout clam` writes it).

A layout is a small reader (`LAYOUTS`: name -> function reading a file's geometry); "auto" picks TRIDENT when the
file has its attributes, else CLAM. Files are checked before anything is read in bulk (`inspect_folder`), so a bad
file stops an import before any row is written; `read_patches` then yields one slide at a time (streamed).
Nothing here writes the store: `cytoretrieve.jobs.import_h5` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import slide_id, tile_id
from cytoretrieve.sources.cohort.labels import SlideLabel

SUFFIXES = (".h5", ".hdf5")
FINITE_CHUNK = 8192  # rows checked for NaN / inf at a time (bounded memory on any file)


@dataclass(frozen=True)
class PatchGeometry:
    """What a row needs to place its patch: the patch side in px as encoded, its level-0 side, and what is known
    of level and pixel size. `attrs` keeps the file's `coords` attributes (JSON-able) for an exact export back."""

    patch_size: int
    extent: int  # level-0 px
    level: int | None = None
    mpp: float | None = None  # um/px of the encoded patch (TRIDENT: 10 / target magnification)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureFile:
    """One slide's feature file, checked: its rows, dimension, encoder (or None) and geometry."""

    path: Path
    slide: str
    layout: str
    rows: int
    dim: int
    encoder: str | None
    geometry: PatchGeometry


def _plain(value: Any) -> Any:
    """An h5 attribute as plain JSON: bytes -> str, numpy scalars and arrays -> Python numbers and lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs(node: h5py.HLObject) -> dict[str, Any]:
    return {k: _plain(v) for k, v in node.attrs.items()}


def _number(attrs: Mapping[str, Any], key: str, path: Path) -> float | None:
    value = attrs.get(key)
    if value is None or value == "None":
        return None
    if isinstance(value, list):  # CLAM's downsample is (dx, dy)
        value = value[0] if value else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CytoError(f"{path}: attribute '{key}' of 'coords' is not a number ({value!r})") from None
    if not np.isfinite(number) or number <= 0:
        raise CytoError(f"{path}: attribute '{key}' of 'coords' must be positive, not {value!r}")
    return number


def trident_geometry(attrs: Mapping[str, Any], path: Path, patches: Path | None = None) -> PatchGeometry:
    """TRIDENT: `patch_size` at `target_magnification`; the level-0 side is `patch_size_level0` when present,
    else patch_size * level0 / target magnification (TRIDENT's own rule); mpp = 10 / target magnification."""
    size = _number(attrs, "patch_size", path)
    if size is None:
        raise CytoError(f"{path}: no 'patch_size' attribute on 'coords' (not a TRIDENT feature file?)")
    level0, target = _number(attrs, "level0_magnification", path), _number(attrs, "target_magnification", path)
    extent = _number(attrs, "patch_size_level0", path)
    if extent is None:
        if level0 is None or target is None:
            raise CytoError(f"{path}: 'coords' has neither 'patch_size_level0' nor both magnifications")
        extent = size * level0 // target
    return PatchGeometry(int(size), int(round(extent)), None, 10.0 / target if target else None, dict(attrs))


def clam_geometry(attrs: Mapping[str, Any], path: Path, patches: Path | None = None) -> PatchGeometry:
    """CLAM: `patch_size` px read at `patch_level`, whose `downsample` (level-0 px per px) gives the level-0
    side. The attributes come from the feature file's `coords` or, when it has none, from the patches file."""
    if "patch_size" not in attrs and patches is not None:
        source = patches / path.name
        if not source.is_file():
            raise CytoError(f"no patches file {source} for {path} (`patches` is CLAM's patches folder)")
        with _open(source) as f:
            if "coords" not in f:
                raise CytoError(f"patches file {source} has no 'coords' dataset")
            attrs = _attrs(f["coords"])
    size = _number(attrs, "patch_size", path)
    if size is None:
        raise CytoError(f"{path}: no patch geometry ('patch_size' on 'coords'): pass `patches`, CLAM's patches "
                        "folder (RESULTS_DIRECTORY/patches) whose files carry it")
    level = _level(attrs.get("patch_level", 0), path)
    downsample = _number(attrs, "downsample", path)
    if downsample is None:
        if level:
            raise CytoError(f"{path}: patches read at level {level} but no 'downsample' attribute gives its scale")
        downsample = 1.0
    return PatchGeometry(int(size), int(round(size * downsample)), level, None, dict(attrs))


def _level(value: Any, path: Path) -> int:
    try:
        level = int(value[0] if isinstance(value, list) else value)
    except (TypeError, ValueError, IndexError):
        raise CytoError(f"{path}: attribute 'patch_level' of 'coords' is not a level ({value!r})") from None
    if level < 0:
        raise CytoError(f"{path}: attribute 'patch_level' of 'coords' must be >= 0, not {level}")
    return level


LAYOUTS: dict[str, Callable[[Mapping[str, Any], Path, Path | None], PatchGeometry]] = {
    "trident": trident_geometry,
    "clam": clam_geometry,
}


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CytoError(f"cannot read {path} as HDF5: {str(e).splitlines()[0]}") from None


def detect_layout(features_attrs: Mapping[str, Any], coords_attrs: Mapping[str, Any]) -> str:
    """"trident" when the file carries TRIDENT's attributes, else "clam"."""
    trident = ("patch_size_level0", "level0_magnification", "target_magnification")
    return "trident" if any(k in coords_attrs for k in trident) or "encoder" in features_attrs else "clam"


def inspect_file(path: str | Path, layout: str = "auto", patches: str | Path | None = None) -> FeatureFile | None:
    """Check one feature file's datasets (names, shapes, lengths) and read its geometry; None for an empty file
    (TRIDENT writes those for slides without patches). Reads attributes and shapes only."""
    path = Path(path)
    with _open(path) as f:
        for name in ("features", "coords"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise CytoError(f"{path} has no '{name}' dataset (a CLAM / TRIDENT feature file has 'features' and 'coords')")
        feats, coords = f["features"], f["coords"]
        if feats.shape and feats.shape[0] == 0:
            return None
        if len(feats.shape) != 2 or feats.shape[1] < 1:
            raise CytoError(f"{path}: 'features' must be 2-D (patches, dimension), not of shape {feats.shape}")
        if len(coords.shape) != 2 or coords.shape[1] != 2:
            raise CytoError(f"{path}: 'coords' must be of shape (patches, 2), not {coords.shape}")
        if feats.shape[0] != coords.shape[0]:
            raise CytoError(f"{path}: 'features' has {feats.shape[0]} rows but 'coords' has {coords.shape[0]}")
        if not (np.issubdtype(feats.dtype, np.floating) and np.issubdtype(coords.dtype, np.number)):
            raise CytoError(f"{path}: 'features' must be floats and 'coords' numbers (found {feats.dtype}, {coords.dtype})")
        f_attrs, c_attrs = _attrs(feats), _attrs(coords)
    chosen = detect_layout(f_attrs, c_attrs) if layout == "auto" else layout
    if chosen not in LAYOUTS:
        raise CytoError(f"unknown `layout` {layout!r}: one of auto, {', '.join(LAYOUTS)}")
    geometry = LAYOUTS[chosen](c_attrs, path, Path(patches) if patches else None)
    encoder = f_attrs.get("encoder")
    encoder = str(encoder) if encoder not in (None, "", "None") else None
    return FeatureFile(path, slide_id(path.stem), chosen, int(feats.shape[0]), int(feats.shape[1]), encoder, geometry)


def feature_files(folder: str | Path) -> list[Path]:
    """The `.h5` files of a folder (or of its `h5_files/`, CLAM's feature folder), sorted; none is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CytoError(f"no folder {folder} (`folder` holds one .h5 feature file per slide)")
    if (folder / "h5_files").is_dir():
        folder = folder / "h5_files"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise CytoError(f"no .h5 feature files in {folder}")
    return files


def _coords(path: Path, raw: np.ndarray) -> np.ndarray:
    """Level-0 x, y as int64; coordinates that are not whole pixels, or that repeat, are refused."""
    if np.issubdtype(raw.dtype, np.floating) and (not np.isfinite(raw).all() or (raw != np.round(raw)).any()):
        raise CytoError(f"{path}: 'coords' must be whole level-0 pixels")
    xy = raw.astype(np.int64)
    repeated = len(xy) - len(np.unique(xy, axis=0))
    if repeated:
        raise CytoError(f"{path}: {repeated} patches repeat the coordinates of another (each patch is stored once)")
    return xy


def check_values(path: Path, rows: int) -> None:
    """Refuse a file whose vectors hold NaN or inf (counted over the whole file, read in chunks) or whose
    coordinates are not whole, distinct pixels: checked before an import writes anything."""
    bad = 0
    with _open(path) as f:
        feats = f["features"]
        for start in range(0, rows, FINITE_CHUNK):
            block = feats[start:start + FINITE_CHUNK]
            bad += int((~np.isfinite(block)).any(axis=1).sum())
        _coords(path, np.asarray(f["coords"][:]))
    if bad:
        raise CytoError(f"{path}: {bad} of {rows} patch vectors hold NaN or inf: fix or drop them before importing")


def inspect_folder(folder: str | Path, *, layout: str = "auto", patches: str | Path | None = None,
                   encoder: str | None = None) -> tuple[list[FeatureFile], list[str], str]:
    """(checked files, notes, encoder) for a folder: every file valid, one dimension, one encoder, finite vectors.

    The encoder is the files' own (`encoder` attribute) or, when they name none, the given `encoder`; a file
    naming another, or files naming several, are refused with the file at fault.
    """
    files: list[FeatureFile] = []
    notes: list[str] = []
    seen: dict[str, Path] = {}
    for path in feature_files(folder):
        ff = inspect_file(path, layout, patches)
        if ff is None:
            notes.append(f"{path.name}: no patches, skipped")
            continue
        if ff.slide in seen:
            raise CytoError(f"{path} and {seen[ff.slide]} are both slide '{ff.slide}': keep one")
        seen[ff.slide] = path
        if files and ff.dim != files[0].dim:
            raise CytoError(f"{path}: {ff.dim}-d features, but {files[0].path.name} has {files[0].dim}-d: "
                            "a table holds one encoder's vectors")
        named = ff.encoder or encoder
        if named is None:
            raise CytoError(f"{path} names no encoder (CLAM files do not): pass `encoder`, the model that made them")
        if encoder and ff.encoder and ff.encoder != encoder:
            raise CytoError(f"{path} says its encoder is '{ff.encoder}', not `encoder` '{encoder}'")
        first = files[0].encoder or encoder if files else named
        if named != first:
            raise CytoError(f"{path}: encoder '{named}', but {files[0].path.name} has '{first}': "
                            "a table holds one encoder's vectors")
        check_values(path, ff.rows)
        files.append(ff)
    if not files:
        raise CytoError(f"no patches in any feature file of {folder}")
    return files, notes, files[0].encoder or str(encoder)


def read_patches(ff: FeatureFile, *, dataset: str, label: SlideLabel | None = None,
                 slide_path: str | None = None, slide_mpp: float | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(row dicts, vectors float32) of one slide's file: ids `slide@x,y,extent`, level-0 x, y, patch geometry and
    the slide's label."""
    with _open(ff.path) as f:
        vectors = np.asarray(f["features"][:], dtype=np.float32)
        xy = _coords(ff.path, np.asarray(f["coords"][:]))
    geo = ff.geometry
    mpp = geo.mpp if geo.mpp is not None else (slide_mpp * geo.extent / geo.patch_size if slide_mpp else None)
    base = {
        "dataset": dataset, "path": slide_path, "label": label.label if label else None,
        "binary": label.binary if label else None, "group": ff.slide, "slide": ff.slide, "level": geo.level,
        "tile_size": geo.patch_size, "mpp": mpp,
    }
    rows = [{**base, "id": tile_id(ff.slide, x, y, geo.extent), "x": x, "y": y} for x, y in xy.tolist()]
    return rows, vectors


def geometry_meta(files: list[FeatureFile]) -> dict[str, Any]:
    """Per-slide source attributes for the table's metadata (JSON), so an export can write them back as read."""
    return {ff.slide: {"layout": ff.layout, "file": ff.path.name,
                       "coords_attrs": json.loads(json.dumps(ff.geometry.attrs, default=str))} for ff in files}
