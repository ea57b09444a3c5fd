"""Patch feature files out: a vector table of tiles -> one `.h5` file per slide, as CLAM or TRIDENT write them.

- `trident`: `OUT/<slide>.h5` with `features` float32 (N, d) (attributes `encoder`, `name`, `savetodir`) and
  `coords` int64 (N, 2) (attributes `patch_size`, `patch_size_level0`, `level0_magnification`,
  `target_magnification`, `overlap`, `name`, `savetodir`), what `trident.IO.read_coords` and TRIDENT's slide
  encoders read.
- `clam`: `OUT/h5_files/<slide>.h5` with `features` float32 and `coords` int32 (what CLAM's
  `extract_features_fp.py` writes and `Generic_MIL_Dataset` reads), and `OUT/patches/<slide>.h5` with `coords`
  int64 and the patch attributes `patch_size`, `patch_level`, `downsample`, `name`, `save_path` (what
  `Whole_Slide_Bag_FP` and `read_coords_legacy` read), and `OUT/pt_files/<slide>.pt`, the features as a torch
  float32 tensor (what CLAM's training reads by default). The feature file's `coords` carry the same attributes,
  so `import h5` needs no patches folder to read it back.

Geometry comes from the rows: level-0 `x`, `y`; the patch side `tile_size`; its level-0 side from the tile id
(`slide@x,y,extent`); `level`; magnification = 10 / `mpp` (TRIDENT's convention). A table imported from h5 files
keeps each slide's source attributes in its metadata, and they are written back as read. The export is
streamed (one scan of the table, each batch appended to its slides' files) and atomic: files are written under
`.partial` names and renamed at the end; on any error nothing is left behind. Only the store is read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import parse_tile_id
from cytoretrieve.store.tables import VectorTable

DEFAULT_MAGNIFICATION = 20.0  # assumed when the rows carry no pixel size (and said so in the notes)
PARTIAL = ".partial"


@dataclass
class SlidePlan:
    """What one slide's files hold: its row count, level-0 patch side, and the attributes to write."""

    slide: str
    rows: int
    tile_size: int
    extent: int
    level: int | None
    mpp: float | None
    source: dict[str, Any] | None  # the slide's attributes as imported (table metadata), if any
    paths: dict[str, Path] = field(default_factory=dict)
    h5_kinds: tuple[str, ...] = ()  # the paths written as h5 while streaming
    written: int = 0


@dataclass
class ExportReport:
    table: str
    out: str
    layout: str
    slides: int = 0
    rows: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """As JSON: the files counted, not listed."""
        return {**asdict(self), "files": len(self.files), "rows_per_second": round(self.rows / max(self.seconds, 1e-9), 1)}


# --- layouts: file names and attributes --------------------------------------------------------------------


def _magnifications(plan: SlidePlan) -> tuple[float, float]:
    """(level-0, target) magnification: target = 10 / mpp, level 0 = target * level-0 side / patch side."""
    target = 10.0 / plan.mpp if plan.mpp else DEFAULT_MAGNIFICATION
    target = round(target, 6)
    level0 = target * plan.extent / plan.tile_size
    return _whole(level0), _whole(target)


def _whole(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def trident_paths(out: Path, slide: str) -> dict[str, Path]:
    return {"features": out / f"{slide}.h5"}


def trident_attrs(plan: SlidePlan, out: Path, encoder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(features attributes, coords attributes) as TRIDENT writes them."""
    source = plan.source if plan.source and plan.source.get("layout") == "trident" else None
    if source:
        coords = dict(source["coords_attrs"])
    else:
        level0, target = _magnifications(plan)
        coords = {"patch_size": plan.tile_size, "patch_size_level0": plan.extent, "level0_magnification": level0,
                  "target_magnification": target, "overlap": 0}
    coords.update({"name": plan.slide, "savetodir": str(out)})
    return {"name": plan.slide, "savetodir": str(out), "encoder": encoder}, coords


def clam_paths(out: Path, slide: str) -> dict[str, Path]:
    return {"features": out / "h5_files" / f"{slide}.h5", "patches": out / "patches" / f"{slide}.h5",
            "pt": out / "pt_files" / f"{slide}.pt"}


def clam_pt(plan: SlidePlan) -> None:
    """CLAM's `pt_files/<slide>.pt` (what its training reads by default): the features as a float32 tensor."""
    import h5py
    import torch

    with h5py.File(_partial(plan.paths["features"]), "r") as f:
        features = torch.from_numpy(f["features"][:])
    torch.save(features, _partial(plan.paths["pt"]))


def clam_attrs(plan: SlidePlan, out: Path, encoder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(features attributes, coords attributes) as CLAM's patching writes them (features carry none)."""
    source = plan.source if plan.source and plan.source.get("layout") == "clam" else None
    if source and "patch_size" in source["coords_attrs"]:
        coords = dict(source["coords_attrs"])
    else:
        scale = plan.extent / plan.tile_size
        coords = {"patch_size": plan.tile_size, "patch_level": plan.level or 0, "downsample": [scale, scale]}
    coords.update({"name": plan.slide, "save_path": str(out / "patches")})
    return {}, coords


@dataclass(frozen=True)
class Layout:
    paths: Callable[[Path, str], dict[str, Path]]
    attrs: Callable[[SlidePlan, Path, str], tuple[dict[str, Any], dict[str, Any]]]
    coords_dtype: dict[str, type]  # per h5 file kind: the dtype of its `coords`
    extra: Callable[[SlidePlan], None] | None = None  # files made from a slide's finished h5 (CLAM's .pt)


LAYOUTS: dict[str, Layout] = {
    "trident": Layout(trident_paths, trident_attrs, {"features": np.int64}),
    "clam": Layout(clam_paths, clam_attrs, {"features": np.int32, "patches": np.int64}, clam_pt),
}


# --- planning ----------------------------------------------------------------------------------------------


def _extent(row_id: str, x: int, y: int, tile_size: int) -> int:
    parsed = parse_tile_id(row_id)
    return parsed[3] if parsed and parsed[1] == x and parsed[2] == y else int(tile_size)


def plan_slides(table: VectorTable, where: str | None = None) -> list[SlidePlan]:
    """One plan per slide of the table (rows matching `where`); rows without a slide or location, or a slide
    with patches of several sizes, are refused (a CLAM / TRIDENT file holds one patch size)."""
    meta = table.read(["id", "slide", "x", "y", "tile_size", "level", "mpp"], where)
    if meta.num_rows == 0:
        raise CytoError(f"table '{table.name}' has no rows{' matching `where`' if where else ''} to export")
    for column in ("slide", "x", "y"):
        nulls = meta.column(column).null_count
        if nulls:
            raise CytoError(f"table '{table.name}': {nulls} rows have no {column}: `export h5` needs tile rows "
                            "(slide and level-0 x, y)")
    grouped = meta.group_by("slide", use_threads=False).aggregate([
        ("id", "count"), ("id", "first"), ("x", "first"), ("y", "first"), ("tile_size", "min"), ("tile_size", "max"),
        ("level", "min"), ("level", "max"), ("mpp", "min"), ("mpp", "max")])
    sources = ((table.meta.get("dataset") or {}).get("h5") or {}).get("slides") or {}
    plans = []
    for g in grouped.to_pylist():
        slide = g["slide"]
        if g["tile_size_min"] != g["tile_size_max"] or g["level_min"] != g["level_max"] or g["mpp_min"] != g["mpp_max"]:
            raise CytoError(f"slide '{slide}' of table '{table.name}' has patches of several sizes or levels: "
                            "a feature file holds one (pass `where` to pick them)")
        size = g["tile_size_min"]
        if not size:
            raise CytoError(f"slide '{slide}' of table '{table.name}' has rows without tile_size")
        plans.append(SlidePlan(slide, g["id_count"], int(size), _extent(g["id_first"], g["x_first"], g["y_first"], size),
                               g["level_min"], g["mpp_min"], sources.get(slide)))
    return sorted(plans, key=lambda p: p.slide)


# --- writing -----------------------------------------------------------------------------------------------


def _check_out(out: Path, plans: Sequence[SlidePlan], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CytoError(f"`out` {out} exists and is not a folder")
    taken = [p for plan in plans for p in plan.paths.values() if p.exists()]
    if taken and not overwrite:
        raise CytoError(f"`out` {out} already holds {len(taken)} of the files to write (e.g. {taken[0]}): "
                        "pass `overwrite` to replace them")


def _make_dirs(folders: Sequence[Path]) -> list[Path]:
    """Create the folders; return those that did not exist, parents first (an error removes them again)."""
    made: list[Path] = []
    for folder in folders:
        missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
        folder.mkdir(parents=True, exist_ok=True)
        made.extend(p for p in missing if p not in made)
    return made


def _partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL)


def _create(plan: SlidePlan, kind: str, layout: Layout, dim: int, attrs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    import h5py

    with h5py.File(_partial(plan.paths[kind]), "w") as f:
        if kind == "features":
            feats = f.create_dataset("features", shape=(plan.rows, dim), dtype=np.float32)
            _set_attrs(feats, attrs[0])
        coords = f.create_dataset("coords", shape=(plan.rows, 2), dtype=layout.coords_dtype[kind])
        _set_attrs(coords, attrs[1])


def _set_attrs(node: Any, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        node.attrs[key] = "None" if value is None else value


def _write_block(plan: SlidePlan, vectors: np.ndarray, xy: np.ndarray) -> None:
    import h5py

    start, stop = plan.written, plan.written + len(xy)
    if stop > plan.rows:
        raise CytoError(f"slide '{plan.slide}' gained rows during the export: run it again")
    for kind, path in plan.paths.items():
        if kind not in plan.h5_kinds:
            continue
        with h5py.File(_partial(path), "r+") as f:
            if kind == "features":
                f["features"][start:stop] = vectors
            f["coords"][start:stop] = xy
    plan.written = stop


def _stream(table: VectorTable, plans: dict[str, SlidePlan], where: str | None) -> None:
    """One scan of the table; each batch's rows appended to their slides' files in scan order."""
    for batch in table.scan(["slide", "x", "y", "vector"], where):
        slides = batch.column("slide").to_numpy(zero_copy_only=False)
        vec = batch.column("vector")
        vectors = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), table.dim)
        xy = np.stack([batch.column("x").to_numpy(), batch.column("y").to_numpy()], axis=1)
        for slide in dict.fromkeys(slides.tolist()):
            idx = np.flatnonzero(slides == slide)
            _write_block(plans[slide], vectors[idx], xy[idx])


def export_h5(table: VectorTable, out: str | Path, *, layout: str = "trident", overwrite: bool = False,
              where: str | None = None) -> ExportReport:
    """Write one feature file per slide of `table` into `out` in `layout`; nothing is written on error."""
    if layout not in LAYOUTS:
        raise CytoError(f"unknown `layout` {layout!r}: one of {', '.join(LAYOUTS)}")
    start = time.perf_counter()
    out = Path(out)
    spec = LAYOUTS[layout]
    plans = plan_slides(table, where)
    for plan in plans:
        plan.paths = spec.paths(out, plan.slide)
        plan.h5_kinds = tuple(spec.coords_dtype)
    _check_out(out, plans, overwrite)
    report = ExportReport(table.name, str(out), layout)
    encoder = str(table.meta["backbone"]["arch"])
    if any(p.mpp is None and not p.source for p in plans) and layout == "trident":
        report.notes.append(f"rows without a pixel size (mpp): their magnification is written as "
                            f"{DEFAULT_MAGNIFICATION:g}x (assumed)")
    made = _make_dirs(sorted({path.parent for plan in plans for path in plan.paths.values()}))
    try:
        for plan in plans:
            attrs = spec.attrs(plan, out, encoder)
            for kind in plan.h5_kinds:
                _create(plan, kind, spec, table.dim, attrs)
        _stream(table, {p.slide: p for p in plans}, where)
        short = [p.slide for p in plans if p.written != p.rows]
        if short:
            raise CytoError(f"slide '{short[0]}' lost rows during the export: run it again")
        for plan in plans if spec.extra else ():
            spec.extra(plan)
        for plan in plans:
            for path in plan.paths.values():
                os.replace(_partial(path), path)
                report.files.append(str(path))
    except BaseException:
        for plan in plans:
            for path in plan.paths.values():
                _partial(path).unlink(missing_ok=True)
        for folder in reversed(made):
            folder.rmdir()
        raise
    report.slides = len(plans)
    report.rows = sum(p.rows for p in plans)
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["LAYOUTS", "ExportReport", "SlidePlan", "export_h5", "plan_slides"]
