"""Tiling a SurePath-sized smear (issue 11): seconds per slide for the `cells` rule, which must not read level 0.

A SurePath deposit is 13 mm across: 26,000 px at 0.5 um/px (20x). The script draws one such slide (28,160 x
28,160 px at 0.5 um/px, a 13 mm round deposit of `--cells` real cells cut from ../shared/data, made by
tests/synthetic_smears.py) and writes it as a pyramidal TIFF, level 0 band by band so memory stays bounded (the
file is generated, not stored: it goes to a temporary folder, or `--keep PATH`), JPEG tiles of 256 px (quality
80, as scanners write them; zlib when imagecodecs is not installed, or with `--compression zlib`). Two pyramids,
as scanners write them: `aperio` (downsamples 1, 4, 16, 64: the cells rule's 4 um/px image is box-averaged from
the 2 um/px level) and `halving` (1, 2, 4, 8, 16, 32: the 4 um/px level is read as is).

First, quality on the test suite's small smears (2.5 mm deposits at three densities, `--quality-seeds`): cell
recall and the share of kept tiles with no cell pixel, at the default settings. Then, timed `--repeats` times
each in this process, after one untimed warm-up run:
- `tile_slide` (open, choose the level, read the detection image, foreground / artefacts / region, the grid's
  decision, the rows): the figure the target (< ~2 s per slide) is about, as wall-clock and as CPU time of the
  process (all its threads: the detection image is read by 2 threads, the rest runs on one). On a machine other
  jobs load, wall-clock grows with the load; CPU time does not;
- its parts, wall-clock: reading the detection image (`thumbnail`) and the detection (`detect_smear`);
- the whole `tile` job (`tile_slides`: also the LanceDB commit of the rows and the overview) into a fresh store,
  with and without `--preview`.
Reading the tiles' pixels for `embed` is separate and not timed here.

    nice .venv/bin/python benchmarks/tile_detect.py                   # both pyramids, 3 repeats (~5 min)
    nice .venv/bin/python benchmarks/tile_detect.py --pyramid aperio --repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np

PYRAMIDS = {"aperio": (1, 4, 16, 64), "halving": (1, 2, 4, 8, 16, 32)}
SIDE = 28_160  # level-0 px (14.1 mm at 0.5 um/px; a multiple of 256 and of every downsample)
DEPOSIT_MM = 13.0
BAND = 512  # level-0 rows drawn at a time (a multiple of every downsample and of the TIFF tile)


def place_cells(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres over the deposit (70% scattered, 30% in clusters) and the library index of each."""
    from cytoretrieve.sources.slides.synthetic_smears import MPP, cell_library

    rng = np.random.default_rng(seed)
    radius, c = DEPOSIT_MM * 500 / MPP, SIDE / 2
    a, d = rng.uniform(0, 2 * np.pi, n), radius * np.sqrt(rng.uniform(0, 1, n))
    pts = np.stack([c + d * np.cos(a), c + d * np.sin(a)], axis=1)
    clustered = rng.random(n) < 0.3
    heads = pts[rng.integers(0, n, max(1, n // 200))]
    pts[clustered] = heads[rng.integers(0, len(heads), clustered.sum())] + rng.normal(0, 80, (clustered.sum(), 2))
    return pts, rng.integers(0, len(cell_library()), n)


def draw_band(y0: int, pts: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Level-0 rows [y0, y0 + BAND) of the slide: glass with every cell that reaches into them multiplied in."""
    from cytoretrieve.sources.slides.synthetic_smears import GLASS, cell_library

    library = cell_library()
    band = np.empty((BAND, SIDE, 3), np.uint8)
    band[:] = GLASS
    near = np.flatnonzero(np.abs(pts[:, 1] - (y0 + BAND / 2)) < BAND / 2 + 150)
    for i in near:
        cell = library[which[i]]
        h, w = cell.mask.shape
        cx0, cy0 = int(pts[i, 0] - w / 2), int(pts[i, 1] - h / 2)
        top, bottom = max(cy0, y0), min(cy0 + h, y0 + BAND)
        left, right = max(cx0, 0), min(cx0 + w, SIDE)
        if top >= bottom or left >= right:
            continue
        t = np.where(cell.mask[..., None], cell.transmission, 1.0)[top - cy0: bottom - cy0, left - cx0: right - cx0]
        region = band[top - y0: bottom - y0, left:right]
        region[:] = (region * t).round().clip(0, 255).astype(np.uint8)
    return band


def write_slide(path: Path, downsamples: tuple[int, ...], n_cells: int, compression: str, seed: int = 0) -> Path:
    """The SurePath-sized smear as a pyramidal TIFF: level 0 streamed band by band, reduced levels kept in memory."""
    import tifffile
    from PIL import Image

    from cytoretrieve.sources.slides.synthetic_smears import MPP

    pts, which = place_cells(n_cells, seed)
    reduced = {d: np.empty((SIDE // d, SIDE // d, 3), np.uint8) for d in downsamples[1:]}

    def level0_tiles():
        for y0 in range(0, SIDE, BAND):
            band = draw_band(y0, pts, which)
            img = Image.fromarray(band)
            for d, out in reduced.items():
                out[y0 // d: (y0 + BAND) // d] = np.asarray(img.reduce(d))
            for ty in range(0, BAND, 256):
                for tx in range(0, SIDE, 256):
                    tile = np.zeros((256, 256, 3), np.uint8)
                    part = band[ty: ty + 256, tx: tx + 256]
                    tile[: part.shape[0], : part.shape[1]] = part
                    yield tile

    partial = path.with_suffix(".partial")
    with tifffile.TiffWriter(partial, bigtiff=True) as tw:
        options = {"photometric": "rgb", "compression": compression, "resolutionunit": "CENTIMETER",
                   "compressionargs": {"level": 80 if compression == "jpeg" else 1}}
        tw.write(level0_tiles(), shape=(SIDE, SIDE, 3), dtype=np.uint8, tile=(256, 256),
                 resolution=(1e4 / MPP, 1e4 / MPP), **options)
        for d, level in reduced.items():
            tw.write(level, tile=(256, 256), subfiletype=1, resolution=(1e4 / (MPP * d),) * 2, **options)
    return partial.rename(path)  # a run stopped half-way leaves no slide to reuse


def time_parts(path: Path) -> dict[str, float]:
    """One timed `tile_slide`, and its two parts timed on their own."""
    from cytoretrieve.sources.slides.deposit import thumbnail
    from cytoretrieve.sources.slides.grid import GridSpec
    from cytoretrieve.sources.slides.reader import Slide
    from cytoretrieve.sources.slides.smear import SmearParams, detect_smear
    from cytoretrieve.sources.slides.tiling import tile_slide

    t0, c0 = time.perf_counter(), time.process_time()
    tiled = tile_slide(path, GridSpec(), table="bench")
    t1, c1 = time.perf_counter(), time.process_time()
    p = SmearParams()
    with Slide(path) as slide:
        rgb, ds = thumbnail(slide, p.detect_mpp, p.max_side, coarsest_mpp=p.coarsest_mpp)
        t2 = time.perf_counter()
        detect_smear(rgb, slide.info.mpp * ds, p)
        t3 = time.perf_counter()
    r = tiled.result
    return {"tile_slide_s": t1 - t0, "tile_slide_cpu_s": c1 - c0, "read_detection_image_s": t2 - t1, "detect_s": t3 - t2,
            "detect_px": int(rgb.shape[0] * rgb.shape[1]), "detect_mpp": round(slide.info.mpp * ds, 3),
            "tiles": r.tiles, "region_tiles": r.region_tiles, "grid_tiles": r.grid_tiles,
            "foreground_mm2": round(r.foreground_mm2 or 0, 3), "deposit_mm2": round(r.deposit_mm2 or 0, 2)}


def time_job(path: Path, preview: bool) -> float:
    from cytoretrieve.jobs.tile import tile_slides
    from cytoretrieve.store.tables import Store

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tile_slides([path], Store(Path(tmp) / "store"), preview=Path(tmp) / "qc" if preview else None)
        return time.perf_counter() - t0


def bench(name: str, path: Path, repeats: int) -> dict[str, Any]:
    time_parts(path)  # warm-up: imports, the file in the page cache
    runs = [time_parts(path) for _ in range(repeats)]
    out: dict[str, Any] = {k: v for k, v in runs[0].items() if not k.endswith("_s")}
    for key in ("tile_slide_s", "tile_slide_cpu_s", "read_detection_image_s", "detect_s"):
        out[key] = round(_common.median([r[key] for r in runs]), 3)
        out[key[:-2] + "_range_s"] = [round(min(r[key] for r in runs), 3), round(max(r[key] for r in runs), 3)]
    out["job_s"] = round(_common.median([time_job(path, False) for _ in range(repeats)]), 3)
    out["job_with_preview_s"] = round(_common.median([time_job(path, True) for _ in range(repeats)]), 3)
    print(f"{name}: tile_slide {out['tile_slide_s']:.2f} s wall (range {out['tile_slide_range_s']}), "
          f"{out['tile_slide_cpu_s']:.2f} s CPU = read "
          f"{out['read_detection_image_s']:.2f} s ({out['detect_px'] / 1e6:.1f} Mpx at {out['detect_mpp']} um/px) + "
          f"detect {out['detect_s']:.2f} s + rest; job {out['job_s']:.2f} s, with preview "
          f"{out['job_with_preview_s']:.2f} s; {out['tiles']} tiles kept of {out['region_tiles']} in the region "
          f"({out['grid_tiles']} on the grid)")
    return out


def smear_quality(folder: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Cell recall and empty kept tiles of the default rule on the test suite's small smears, seed by seed."""
    from cytoretrieve.sources.slides.grid import GridSpec
    from cytoretrieve.sources.slides.synthetic_smears import DENSITIES, tile_truth, write_smear
    from cytoretrieve.sources.slides.tiling import tile_slide

    rows = []
    for seed in seeds:
        for density in DENSITIES:
            smear = write_smear(folder / f"quality-{density}-{seed}.tiff", density, seed=seed)
            g = tile_slide(smear.path, GridSpec(), table="bench").grid
            centres, touched = tile_truth(smear, g.xs, g.ys, g.choice.extent)
            row = {"seed": seed, "density": density, "cells": len(smear.centres), "kept": g.n_kept,
                   "recall": round(float(centres[g.kept].sum() / centres.sum()), 4),
                   "empty": round(float((~touched[g.kept]).mean()), 4)}
            print(f"smear {density} seed {seed}: {row['cells']} cells, {row['kept']} tiles kept, recall "
                  f"{row['recall']:.4f}, kept tiles with no cell {row['empty']:.2%}")
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pyramid", choices=[*PYRAMIDS, "both"], default="both")
    ap.add_argument("--cells", type=int, default=60_000, help="cells on the slide")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compression", choices=["jpeg", "zlib"], default="jpeg",
                    help="tile compression: jpeg (quality 80, as scanners write; needs imagecodecs) or zlib")
    ap.add_argument("--keep", type=Path, help="write the slides into this folder and keep them (reused if there)")
    ap.add_argument("--quality-seeds", default="0,1,2",
                    help="seeds of the small test smears whose recall is printed first ('' for none)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.compression == "jpeg" and importlib.util.find_spec("imagecodecs") is None:
        print("imagecodecs is not installed (pip install imagecodecs): zlib tiles instead of JPEG")
        args.compression = "zlib"
    info = _common.machine()
    _common.print_machine(info)
    results: dict[str, Any] = {"machine": info, "cells": args.cells, "side_px": SIDE, "deposit_mm": DEPOSIT_MM,
                               "compression": args.compression}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        seeds = [int(x) for x in args.quality_seeds.split(",") if x.strip()]
        results["quality"] = smear_quality(folder, seeds)
        for name in PYRAMIDS if args.pyramid == "both" else [args.pyramid]:
            path = folder / f"surepath-{name}-{args.cells}-{args.compression}.tiff"
            if not path.exists():
                t0 = time.perf_counter()
                write_slide(path, PYRAMIDS[name], args.cells, args.compression)
                print(f"{name}: wrote {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f} s")
            results[name] = bench(name, path, args.repeats)
    results["loadavg_end"] = _common.print_load("at the end")
    _common.write_json(args.json, results)


if __name__ == "__main__":
    main()
