"""How fast `cells` is (issue 23): nuclei per CPU-second on real fields, a SurePath-sized smear end to end, and
embedding cell crops against the bare forward pass.

1. **Fields**: the `classic` detector on Cervix93 fields (`--fields`, grey 1280 x 960 at `--mpp`): nuclei per
   CPU-second of the detector alone, and the whole `cells` job (reading, detecting, rows, previews off, commits)
   into a fresh store, wall and CPU seconds.
2. **A SurePath-sized smear**: the 13 mm deposit of `benchmarks/tile_detect.py` (`--cells` real cells, aperio
   pyramid), written once to a temporary folder; the `cells` job on it (the `cells` tile rule, then the detector on
   every kept tile, shared among `--workers` processes): wall seconds, and CPU seconds of this process and of its
   worker processes (read from /proc while they run: the pool's workers are not this process's children). Target
   <= 30 s on 2 cores.
3. **Embedding the crops**: the cell table of part 1 embedded by the real `embed` job (resnet18, random weights,
   `--image-size`, 0 workers) against `forward` on the same crops read beforehand, measured right before and after
   (CPU-time ratio too). Target >= 0.9.
4. **Before / after** (`--before REV`, e.g. the commit before a detector change): the `classic` detector of git
   revision REV (its `classic.py`, loaded beside the current one) against the current one, in the same process,
   on `--compare-tiles` kept tiles of the smear (spread over the slide) and on the Cervix93 fields of part 1:
   CPU seconds of each, the speed-up, and whether the nuclei found are the same.

    .venv/bin/python benchmarks/cells_speed.py --json out/cells_speed.json
    .venv/bin/python benchmarks/cells_speed.py --fields 6 --cells 20000   # quick
    .venv/bin/python benchmarks/cells_speed.py --before a024b8e --skip-embed --smear-path /tmp/surepath.tiff
    .venv/bin/python benchmarks/cells_speed.py --skip-embed --skip-fields --workers 2 --smear-path /tmp/surepath.tiff

`--before` compares the two detectors with the same settings (those of REV's defaults, unless `--settings` gives
a JSON of overrides applied to both): a speed-up of the code, not of a change of settings; `--settings own` runs
each with its own defaults (code and settings together: the nuclei then differ).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common

CERVIX93 = _common.ROOT.parent / "shared" / "data" / "cervix93"


class DescendantsCpu:
    """CPU seconds of every process descended from this one (a process pool's workers, the forkserver), sampled
    from /proc every `every` s while running: such processes are reaped by the forkserver, not by this process, so
    `RUSAGE_CHILDREN` never sees them. Linux only (0 elsewhere); at most one sampling interval of a worker's last
    moments is missed."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.seen, self._stop = every, {}, threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        stats = {}
        for d in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
            if d.name.isdigit():
                try:
                    f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / self._tick)  # ppid, utime + stime
        mine = {os.getpid()}
        for _ in range(4):  # children, grandchildren (forkserver -> workers), ...
            mine |= {pid for pid, (ppid, _) in stats.items() if ppid in mine}
        for pid in mine - {os.getpid()}:
            self.seen[pid] = max(self.seen.get(pid, 0.0), stats[pid][1])

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> DescendantsCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return float(sum(self.seen.values()))


def fields_part(args: argparse.Namespace, store: Any) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from cytoretrieve.jobs.cells import expand_sources, find_cells_in
    from cytoretrieve.sources.slides.detectors import get_detector

    files = sorted((CERVIX93 / "EDF").glob("frame*.png"))[: args.fields]
    detector = get_detector("classic")
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    detector(images[0], args.mpp)  # warm-up
    cpu = time.process_time()
    nuclei = sum(len(detector(im, args.mpp)) for im in images)
    cpu = time.process_time() - cpu
    wall, cpu_job = time.perf_counter(), time.process_time()
    report = find_cells_in(expand_sources(files, mpp=args.mpp), store, table="fields")
    wall, cpu_job = time.perf_counter() - wall, time.process_time() - cpu_job
    out = {"fields": len(files), "nuclei": nuclei, "detector_cpu_s": cpu, "nuclei_per_cpu_s": nuclei / cpu,
           "job_wall_s": wall, "job_cpu_s": cpu_job, "job_cells": report.cells_added}
    print(f"fields: {len(files)} Cervix93 fields, {nuclei} nuclei, detector {nuclei / cpu:.0f} nuclei per CPU-s; "
          f"the cells job {wall:.1f} s wall ({cpu_job:.1f} CPU-s) for {report.cells_added} cells", flush=True)
    return out


def write_smear(args: argparse.Namespace, folder: Path) -> Path:
    from tile_detect import PYRAMIDS, write_slide

    if args.smear_path and Path(args.smear_path).is_file():
        print(f"smear: reusing {args.smear_path} (written by an earlier run with the same --cells)", flush=True)
        return Path(args.smear_path)
    if args.smear_path:
        folder = Path(args.smear_path).parent
        folder.mkdir(parents=True, exist_ok=True)

    try:
        import imagecodecs  # noqa: F401
        compression = "jpeg"
    except ImportError:
        compression = "zlib"
    t = time.perf_counter()
    name = Path(args.smear_path).name if args.smear_path else "surepath.tiff"
    path = write_slide(folder / name, PYRAMIDS["aperio"], args.cells, compression)
    print(f"smear: wrote {path.name} ({args.cells} cells, {compression}) in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def _classic_at(rev: str) -> Any:
    """The `classic` detector module as it was at git revision `rev`, imported under another name."""
    import importlib.util
    import subprocess
    import sys

    source = subprocess.run(["git", "show", f"{rev}:cytoretrieve/sources/slides/detectors/classic.py"],
                            cwd=_common.ROOT, check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("classic_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["classic_before"] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:classic.py", "exec"), module.__dict__)
    return module


def before_after_part(args: argparse.Namespace, smear: Path) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from cytoretrieve.sources.slides.detectors.classic import ClassicDetector
    from cytoretrieve.sources.slides.grid import GridSpec
    from cytoretrieve.sources.slides.reader import Slide
    from cytoretrieve.sources.slides.tiling import tile_slide

    old = _classic_at(args.before)
    if args.settings == "own":  # each with its own defaults: the code and the settings together
        settings = None
        before, after = old.ClassicDetector(), ClassicDetector()
    else:  # the same settings for both: the code alone
        settings = {**old.ClassicSettings().to_dict(), **json.loads(args.settings or "{}")}
        before, after = old.ClassicDetector(old.ClassicSettings(**settings)), ClassicDetector(**settings)
    rows = tile_slide(smear, GridSpec(rule="cells"), table="t", focus=False).rows
    rows = rows[:: max(1, len(rows) // args.compare_tiles)][: args.compare_tiles]
    with Slide(smear) as slide:
        tiles = [(np.asarray(slide.read_tile(r["x"], r["y"], r["level"], r["read_size"], r["tile_size"])
                             .convert("RGB")), float(r["mpp"])) for r in rows]
    fields = [(np.asarray(Image.open(f).convert("RGB")), args.mpp)
              for f in sorted((CERVIX93 / "EDF").glob("frame*.png"))[: args.fields]]
    out: dict[str, Any] = {"before": args.before, "settings": settings}
    for name, images in (("smear_tiles", tiles), ("cervix93_fields", fields)):
        runs = {}
        for label, det in (("before", before), ("after", after), ("before_again", before), ("after_again", after)):
            cpu = time.process_time()
            found = [det(im, mpp) for im, mpp in images]
            runs[label] = (time.process_time() - cpu, found)
        same = all(len(a) == len(b) and np.allclose(a.xy, b.xy) and np.allclose(a.area_um2, b.area_um2)
                   and np.allclose(a.cell_area_um2, b.cell_area_um2, equal_nan=True)
                   for a, b in zip(runs["before"][1], runs["after"][1]))
        cpu_before = (runs["before"][0] + runs["before_again"][0]) / 2
        cpu_after = (runs["after"][0] + runs["after_again"][0]) / 2
        nuclei = sum(map(len, runs["after"][1]))
        out[name] = {"images": len(images), "nuclei": nuclei, "cpu_s_before": cpu_before, "cpu_s_after": cpu_after,
                     "ms_per_image_before": 1000 * cpu_before / len(images),
                     "ms_per_image_after": 1000 * cpu_after / len(images), "speedup": cpu_before / cpu_after,
                     "same_nuclei": same}
        print(f"before/after ({args.before} vs now), {name}: {len(images)} images, {nuclei} nuclei; "
              f"{1000 * cpu_before / len(images):.1f} vs {1000 * cpu_after / len(images):.1f} CPU-ms per image: "
              f"x{cpu_before / cpu_after:.2f}; same nuclei: {same}", flush=True)
    return out


def smear_part(args: argparse.Namespace, path: Path, store: Any) -> dict[str, Any]:
    from cytoretrieve.jobs.cells import Source, find_cells_in

    wall, cpu = time.perf_counter(), time.process_time()
    with DescendantsCpu() as workers:
        report = find_cells_in([Source(path)], store, table="smear", workers=args.workers, focus=not args.no_focus)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    r = report.results[0]
    total = cpu + workers.seconds
    print(f"smear: {r.cells} cells on {r.tiles} kept tiles in {wall:.1f} s wall with {args.workers or 'auto'} "
          f"workers{', no focus scores' if args.no_focus else ''}; {total:.1f} CPU-s ({cpu:.1f} this process, {workers.seconds:.1f} its workers), i.e. "
          f"{total / 2:.1f} s on 2 cores fully used; target 30 s", flush=True)
    return {"cells_drawn": args.cells, "cells_found": r.cells, "tiles": r.tiles, "wall_s": wall, "cpu_s": total,
            "cpu_s_main": cpu, "cpu_s_workers": workers.seconds, "workers": args.workers, "focus": not args.no_focus,
            "status": r.status,
            "reason": r.reason}


def embed_part(args: argparse.Namespace, store: Any) -> dict[str, Any]:
    import torch

    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.models.inference import forward, prepare
    from cytoretrieve.sources.slides.reader import SlideReader
    from cytoretrieve.store.tiles import open_tile_table

    backbone = load_backbone("resnet18", "random", image_size=args.image_size)
    rows = open_tile_table(store, "fields").rows()
    reader = SlideReader()
    batch = torch.stack([backbone.preprocessing(reader.read_row(r)) for r in rows])
    model = prepare(backbone, "cpu")
    forward(model, batch[:64], "cpu")

    def bare() -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        for i in range(0, len(batch), 64):
            forward(model, batch[i: i + 64], "cpu")
        return len(batch) / (time.perf_counter() - w), (time.process_time() - c) / len(batch)

    before, before_cpu = bare()
    w, c = time.perf_counter(), time.process_time()
    report = embed("fields", backbone, store, table="fields_r18", workers=0, batch_size=64)
    w, c = time.perf_counter() - w, time.process_time() - c
    after, after_cpu = bare()
    speed = report.added / w
    ratio, cpu_ratio = speed / ((before + after) / 2), (before_cpu + after_cpu) / 2 / (c / report.added)
    print(f"embed: {report.added} cell crops at {speed:.1f} img/s vs bare forward {before:.1f} / {after:.1f} img/s: "
          f"ratio {ratio:.3f} (CPU-time ratio {cpu_ratio:.3f}); target 0.9", flush=True)
    return {"crops": report.added, "embed_img_s": speed, "bare_before_img_s": before, "bare_after_img_s": after,
            "ratio": ratio, "cpu_ratio": cpu_ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fields", type=int, default=24, help="Cervix93 fields (the first N by name)")
    ap.add_argument("--mpp", type=float, default=0.25, help="um/px assumed for the Cervix93 fields")
    ap.add_argument("--cells", type=int, default=60_000, help="cells drawn on the SurePath-sized smear")
    ap.add_argument("--image-size", type=int, default=128, help="embedding input side, px")
    ap.add_argument("--skip-smear", action="store_true")
    ap.add_argument("--skip-fields", action="store_true", help="skip part 1 (and so the embedding, which needs it)")
    ap.add_argument("--no-focus", action="store_true", help="the smear without each crop's focus score")
    ap.add_argument("--workers", type=int, default=None, help="worker processes for the smear (default: the cores)")
    ap.add_argument("--settings", default=None, help="JSON of classic settings for both sides of --before, or `own`: each its defaults")
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--before", default=None, help="git revision whose classic detector to time beside the current")
    ap.add_argument("--smear-path", default=None,
                    help="keep the smear here (reused when it exists: writing it takes minutes); default a temp folder")
    ap.add_argument("--compare-tiles", type=int, default=300, help="smear tiles for --before")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from cytoretrieve.store.tables import Store

    info = _common.machine()
    _common.print_machine(info)
    results: dict[str, Any] = {"machine": info, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="cytoretrieve-cells-") as tmp:
        store = Store(Path(tmp) / "store")
        if not args.skip_fields:
            results["fields"] = fields_part(args, store)
        if not args.skip_embed and not args.skip_fields:
            results["embed"] = embed_part(args, store)
        if not args.skip_smear or args.before:
            smear = write_smear(args, Path(tmp))
            if args.before:
                results["before_after"] = before_after_part(args, smear)
            if not args.skip_smear:
                results["smear"] = smear_part(args, smear, store)
    results["load_end"] = _common.print_load("at the end")
    _common.write_json(args.json, results)


if __name__ == "__main__":
    main()
