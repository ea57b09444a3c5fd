"""How long each slow command stays silent: seconds from starting `cytoretrieve <command>` to its first byte of
output (stderr or stdout, read as it comes), and the whole-process time of `tables` with and without its summaries.

The commands run on small real inputs (a Herlev subset embedded into a temporary store by a random resnet18, the
CMU-1-Small-Region slide, a Cervix93 field), as a terminal would see them: FORCE_COLOR makes rich draw its status
line on the pipe. A command is stopped once its first line has come (`--full` lets it finish and times that too).
Python's own start-up plus `import cytoretrieve.cli` is measured alongside, as the floor every command pays.

    .venv/bin/python benchmarks/first_line.py [--repeats 3] [--full] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERLEV, ROOT, machine, print_load, print_machine, write_json

CLI = [sys.executable, "-m", "cytoretrieve"]
SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
FIELD = ROOT.parent / "shared" / "data" / "cervix93" / "EDF" / "frame007.png"
TABLE = "herlev_resnet18"


def first_output(args: list[str], env: dict[str, str], full: bool, limit: float = 120.0) -> tuple[float, float | None]:
    """(seconds to the first byte on stdout or stderr, seconds to exit or None when stopped after the first byte)."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first: float | None = None
    try:
        streams = [proc.stdout, proc.stderr]
        while streams and time.monotonic() - start < limit:
            ready, _, _ = select.select(streams, [], [], 0.01)
            for s in ready:
                if os.read(s.fileno(), 65536):
                    first = first if first is not None else time.monotonic() - start
                else:
                    streams.remove(s)
            if first is not None and not full:
                break
        if full:
            proc.wait(timeout=max(1.0, limit - (time.monotonic() - start)))
            return first if first is not None else float("nan"), time.monotonic() - start
        return first if first is not None else float("nan"), None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _subset(dest: Path, per_class: int) -> Path:
    for folder in sorted(p for p in HERLEV.iterdir() if p.is_dir()):
        (dest / folder.name).mkdir(parents=True)
        for cell in sorted(folder.iterdir())[:per_class]:
            (dest / folder.name / cell.name).symlink_to(cell)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="let each command finish and time that too")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    loads = [print_load("at start")]
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "80", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = tmp / "store"
        cells = _subset(tmp / "cells" / "herlev", 6)
        small = _subset(tmp / "few" / "herlev", 1)
        subprocess.run([*CLI, "embed", str(cells), "--weights", "random", "--backbone", "resnet18", "--image-size",
                        "64", "--store", str(store)], check=True, capture_output=True, env=env)
        (tmp / "labels.csv").write_text("slide,label,binary\n")
        query = next(cells.rglob("*.jpg"))
        commands = {
            "tile": ["tile", str(SLIDE), "--store", str(tmp / "t"), "--table", "t"],
            "cells": ["cells", str(FIELD), "--mpp", "0.25", "--store", str(tmp / "c"), "--table", "c"],
            "embed": ["embed", str(small), "--weights", "random", "--backbone", "resnet18", "--store", str(tmp / "e")],
            "search": ["search", str(query), "--table", TABLE, "--store", str(store)],
            "classify": ["classify", "--table", TABLE, "--store", str(store)],
            "transfer": ["transfer", "--support", TABLE, "--target", TABLE, "--store", str(store)],
            "score": ["score", "--tiles", TABLE, "--labels", str(tmp / "labels.csv"), "--split", str(tmp / "split.json"),
                      "--store", str(store)],
        }
        results: dict[str, dict[str, list[float]]] = {"startup": {"first": []}}
        for name in commands:
            results[name] = {"first": [], "total": []}
        results["tables (summaries)"] = {"total": []}
        results["tables (no summaries)"] = {"total": []}
        summaries = store / ".summaries"
        for _ in range(args.repeats):
            start = time.monotonic()
            subprocess.run([sys.executable, "-c", "import cytoretrieve.cli"], check=True, env=env)
            results["startup"]["first"].append(time.monotonic() - start)
            for name, cmd in commands.items():
                first, total = first_output([*CLI, *cmd], env, args.full)
                results[name]["first"].append(first)
                if total is not None:
                    results[name]["total"].append(total)
            for label, keep in (("tables (no summaries)", False), ("tables (summaries)", True)):
                if not keep:
                    shutil.rmtree(summaries, ignore_errors=True)
                else:  # the run before rewrote them: this one reads them
                    subprocess.run([*CLI, "tables", "--store", str(store)], check=True, capture_output=True, env=env)
                start = time.monotonic()
                subprocess.run([*CLI, "tables", "--store", str(store)], check=True, capture_output=True, env=env)
                results[label]["total"].append(time.monotonic() - start)
    loads.append(print_load("at end"))
    print(f"{'command':<24} {'first output s (median)':>24} {'max':>6} {'whole s (median)':>17}")
    summary = {}
    for name, r in results.items():
        first = statistics.median(r["first"]) if r.get("first") else None
        total = statistics.median(r["total"]) if r.get("total") else None
        summary[name] = {"first_median": first, "total_median": total, **r}
        worst = max(r["first"]) if r.get("first") else None
        cells = ["" if v is None else f"{v:.2f}" for v in (first, worst, total)]
        print(f"{name:<24} {cells[0]:>24} {cells[1]:>6} {cells[2]:>17}")
    write_json(args.json, {"machine": info, "load": loads, "results": summary})


if __name__ == "__main__":
    main()
