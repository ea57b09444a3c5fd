"""`import h5` and `export h5` at cohort scale: rows per second and peak memory for synthetic TRIDENT feature files.

    .venv/bin/python benchmarks/h5_io.py [--slides 286 --patches 5200 --dim 1024] [--measure 286] [--work DIR]
                                         [--keep] [--json out.json]

1. Writes `--measure` synthetic TRIDENT files (`features` float32 (patches, dim), `coords` int64 on a grid, TRIDENT's
   attributes) into a work folder outside the repository (default: the system temp dir). Not timed as part of the
   import; its time is printed.
2. Import: `cytoretrieve.jobs.import_h5.import_h5` into a fresh LanceDB table, in a fresh subprocess, so the peak resident
   memory (ru_maxrss) is the job's own. The job checks every file first (datasets, lengths, NaN / inf, read in
   chunks), then reads and commits one slide at a time, then compacts and indexes the table (`finish`).
3. Export: `cytoretrieve.jobs.export_h5.export_h5` of that table to TRIDENT files, in a fresh subprocess.
4. Round trip: the exported files of a few slides are compared with the originals (vectors and coordinates, exactly).

When `--measure` is below `--slides` (a documented fraction, to keep the run short on a shared machine) the
printed totals for the full cohort are extrapolated from the measured rows per second; peak memory is per slide
(the jobs stream), so it does not grow with the slide count. Figures: BENCHMARKS.md, "CLAM / TRIDENT feature
files (issue 12)".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from _common import loadavg, machine, print_machine, write_json  # noqa: E402

GRID = 512  # level-0 px between patches (256 px at 20x from a 40x slide)


def write_files(folder: Path, slides: int, patches: int, dim: int) -> float:
    """Synthetic TRIDENT feature files; returns the seconds it took."""
    import h5py
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    side = int(np.ceil(np.sqrt(patches)))
    xs, ys = np.meshgrid(np.arange(side) * GRID, np.arange(side) * GRID)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)[:patches].astype(np.int64)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(slides):
        with h5py.File(folder / f"slide-{i:03d}.h5", "w") as f:
            feats = f.create_dataset("features", data=rng.standard_normal((patches, dim), dtype=np.float32))
            feats.attrs.update({"name": f"slide-{i:03d}", "savetodir": str(folder), "encoder": "uni_v1"})
            c = f.create_dataset("coords", data=coords)
            c.attrs.update({"patch_size": 256, "patch_size_level0": GRID, "level0_magnification": 40,
                            "target_magnification": 20, "overlap": 0, "name": f"slide-{i:03d}"})
    return time.perf_counter() - start


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from cytoretrieve.store.tables import Store
store = Store({store!r})
start = time.perf_counter()
if {what!r} == "import":
    from cytoretrieve.jobs.import_h5 import import_h5
    report = import_h5({folder!r}, store, "cohort_uni")
else:
    from cytoretrieve.jobs.export_h5 import export_h5
    report = export_h5(store.open("cohort_uni"), {out!r}, layout="trident")
seconds = time.perf_counter() - start
print(json.dumps({{"rows": report.rows, "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run_child(what: str, **paths: str) -> dict:
    code = CHILD.format(root=str(ROOT), what=what, store=paths["store"], folder=paths.get("folder", ""),
                        out=paths.get("out", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_round_trip(src: Path, out: Path, names: list[str]) -> bool:
    import h5py
    import numpy as np

    for name in names:
        with h5py.File(src / name) as a, h5py.File(out / name) as b:
            if not (np.array_equal(a["features"][:], b["features"][:]) and np.array_equal(a["coords"][:], b["coords"][:])):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=286, help="cohort size the figures are stated for")
    ap.add_argument("--patches", type=int, default=5200)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--measure", type=int, default=None, help="slides actually written and run (default: --slides)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    measure = args.measure or args.slides
    info = machine()
    print_machine(info)
    work = args.work or Path(tempfile.mkdtemp(prefix="cyto-h5-bench-"))
    src, store, out = work / "features_uni_v1", work / "store", work / "export"
    try:
        written = write_files(src, measure, args.patches, args.dim)
        gib = measure * args.patches * args.dim * 4 / 2**30
        print(f"wrote {measure} files x {args.patches} x {args.dim} ({gib:.2f} GiB of float32) in {written:.1f} s")
        results = {"measured_slides": measure, "patches": args.patches, "dim": args.dim, "write_seconds": written}
        for what in ("import", "export"):
            r = run_child(what, store=str(store), folder=str(src), out=str(out))
            rate = r["rows"] / r["seconds"]
            full = args.slides * args.patches / rate
            results[what] = {**r, "rows_per_second": rate, "extrapolated_seconds_full_cohort": full}
            print(f"{what}: {r['rows']:,} rows in {r['seconds']:.1f} s = {rate:,.0f} rows/s, peak RSS "
                  f"{r['peak_rss_mib']:,.0f} MiB" + (f"; {args.slides} slides at this rate: {full:.0f} s (extrapolated)"
                                                     if measure != args.slides else ""))
        names = sorted(p.name for p in src.iterdir())[:3]
        results["round_trip_exact"] = check_round_trip(src, out, names)
        print(f"round trip exact on {len(names)} slides: {results['round_trip_exact']}")
        results["loadavg_end"] = loadavg()
        print(f"load average at the end: {results['loadavg_end']}")
        write_json(args.json, {"machine": info, "results": results})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
