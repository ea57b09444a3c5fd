"""Whole slides: tile reading + decoding throughput, and memory while tiling 100 slides (issue 3).

1. Memory (run first, in a fresh process, so the peak is the tiling's): `tile_slides` over the same SVS under
   100 symlinked names into a fresh store; RSS after slide 1, 50 and 100, and the peak (VmHWM).
2. Throughput: 320 x 320 level-0 tiles of the real Aperio SVS (240 px JPEG tiles), the 54 grid positions in a
   shuffled order, pass after pass:
   - plain: one process, `openslide.OpenSlide.read_region` + RGB conversion + numpy array, default cache;
   - the same with the OpenSlide cache off (every JPEG tile decoded again: the cold cost);
   - `SlideReader.read_row` (what the embed job calls) in one process, and in a torch DataLoader with 1 and 2
     forkserver workers (as `embed` runs them), each worker with its own handle and 64 MiB cache. Worker rates
     are steady-state: from the first batch received to the last; `per_cpu_s` = tiles per CPU-second spent in
     the workers' reads (process time), i.e. the per-core rate with the main process and the OS left out.
   Target: >= 200 tiles/s per core at 320 px.

    .venv/bin/python benchmarks/tile_read.py               # both parts (~1 min on 2 cores)
    .venv/bin/python benchmarks/tile_read.py --quick       # fewer passes, 20 slides
    .venv/bin/python benchmarks/tile_read.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

SVS = _common.ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
TILE = 320


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_part(n_slides: int) -> dict[str, Any]:
    from cytoretrieve.jobs.tile import tile_slides
    from cytoretrieve.store.tables import Store

    marks = {1, n_slides // 2, n_slides}
    rss: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "slides"
        folder.mkdir()
        for i in range(n_slides):
            (folder / f"slide-{i:03d}.svs").symlink_to(SVS)
        done = 0

        def on_result(result: Any) -> None:
            nonlocal done
            done += 1
            if done in marks:
                rss[done] = round(rss_mib(), 1)

        start_rss = rss_mib()
        start = time.perf_counter()
        report = tile_slides([folder], Store(Path(tmp) / "store"), on_result=on_result)
        seconds = time.perf_counter() - start
    return {
        "slides": n_slides,
        "tiles": report.tiles_added,
        "seconds": round(seconds, 1),
        "seconds_per_slide": round(seconds / n_slides, 3),
        "rss_before_mib": round(start_rss, 1),
        "rss_mib_after_slide": rss,
        "peak_rss_mib": round(rss_mib("VmHWM"), 1),
    }


def positions() -> list[tuple[int, int]]:
    import openslide

    w, h = openslide.OpenSlide(str(SVS)).dimensions
    return [(x, y) for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)]


def plain_loop(order: list[tuple[int, int]], cache_bytes: int | None) -> float:
    import numpy as np
    import openslide

    osr = openslide.OpenSlide(str(SVS))
    if cache_bytes is not None:
        osr.set_cache(openslide.OpenSlideCache(cache_bytes))
    start = time.perf_counter()
    for x, y in order:
        np.asarray(osr.read_region((x, y), 0, (TILE, TILE)).convert("RGB"))
    return len(order) / (time.perf_counter() - start)


def rows_for(order: list[tuple[int, int]]) -> list[dict[str, Any]]:
    return [{"path": str(SVS), "x": x, "y": y, "level": 0, "read_size": TILE, "tile_size": TILE} for x, y in order]


def reader_loop(order: list[tuple[int, int]]) -> float:
    import numpy as np

    from cytoretrieve.sources.slides.reader import SlideReader

    reader = SlideReader()
    rows = rows_for(order)
    start = time.perf_counter()
    for row in rows:
        np.asarray(reader.read_row(row))
    return len(rows) / (time.perf_counter() - start)


class TileRows:
    """A map-style dataset over tile rows, as the embed job will build one."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        from cytoretrieve.sources.slides.reader import SlideReader

        self.rows = rows
        self.reader = SlideReader()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        import numpy as np
        import torch

        cpu = time.process_time()
        tile = torch.from_numpy(np.array(self.reader.read_row(self.rows[i])))  # tensors travel in shared memory
        return tile, time.process_time() - cpu


def _stack(items: list[Any]) -> Any:
    import torch

    return torch.stack([t for t, _ in items]), sum(c for _, c in items)


def loader_rate(order: list[tuple[int, int]], workers: int, batch: int = 32) -> tuple[float, float]:
    """Steady-state tiles/s through a DataLoader, and tiles per CPU-second of the workers (reading + decoding)."""
    import torch

    loader = torch.utils.data.DataLoader(TileRows(rows_for(order)), batch_size=batch, num_workers=workers,
                                         collate_fn=_stack, multiprocessing_context="forkserver")
    it = iter(loader)
    next(it)  # workers started, first batch in
    start = time.perf_counter()
    n, cpu = 0, 0.0
    for tiles, seconds in it:
        n += len(tiles)
        cpu += seconds
    return n / (time.perf_counter() - start), n / cpu


def read_part(passes: int, rounds: int) -> dict[str, Any]:
    grid = positions()
    rng = random.Random(0)
    order = [p for _ in range(passes) for p in rng.sample(grid, len(grid))]
    keys = ("plain", "plain_cache_off", "reader", "workers_1", "workers_2", "workers_1_per_cpu_s", "workers_2_per_cpu_s")
    results: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(rounds):  # interleaved: the machine is shared and noisy
        results["plain"].append(plain_loop(order, None))
        results["plain_cache_off"].append(plain_loop(order, 0))
        results["reader"].append(reader_loop(order))
        for w in (1, 2):
            rate, per_cpu = loader_rate(order, w)
            results[f"workers_{w}"].append(rate)
            results[f"workers_{w}_per_cpu_s"].append(per_cpu)
    med = {k: round(_common.median(v), 1) for k, v in results.items()}
    return {"grid_positions": len(grid), "tiles_per_run": len(order), "rounds": rounds,
            "tiles_per_s_median": med, "tiles_per_s_all": {k: [round(x, 1) for x in v] for k, v in results.items()},
            "workers_2_per_core": round(med["workers_2"] / 2, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer passes and rounds, 20 slides")
    parser.add_argument("--slides", type=int, default=100, help="slides (symlinks) in the memory part")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not SVS.is_file():
        sys.exit(f"{SVS} not found")
    n_slides = 20 if args.quick else args.slides
    if args.memory_only:
        print(json.dumps(memory_part(n_slides)))
        return
    info = _common.machine()
    _common.print_machine(info)
    out = subprocess.run([sys.executable, __file__, "--memory-only", "--slides", str(n_slides)],
                         capture_output=True, text=True, check=True)
    memory = json.loads(out.stdout.strip().splitlines()[-1])
    rss = memory["rss_mib_after_slide"]
    print(f"memory: {memory['slides']} slides, {memory['tiles']} tiles in {memory['seconds']} s "
          f"({memory['seconds_per_slide']} s/slide); RSS before {memory['rss_before_mib']} MiB, after slide "
          + ", ".join(f"{k}: {v} MiB" for k, v in rss.items()) + f"; peak {memory['peak_rss_mib']} MiB")
    read = read_part(passes=10 if args.quick else 40, rounds=1 if args.quick else 3)
    med = read["tiles_per_s_median"]
    print(f"read: {read['tiles_per_run']} tiles of {TILE} px per run ({read['grid_positions']} positions), "
          f"median of {read['rounds']} rounds, tiles/s: " + ", ".join(f"{k} {v}" for k, v in med.items())
          + f"; 2 workers per core {read['workers_2_per_core']}")
    _common.write_json(args.json, {"machine": info, "memory": memory, "read": read})


if __name__ == "__main__":
    main()
