"""Run the three benchmark figures one after the other (never in parallel: they share the machine's cores).

    .venv/bin/python benchmarks/run_all.py             # full figures (~20 min on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick     # smoke run of each (~5 min)
    .venv/bin/python benchmarks/run_all.py --json-dir /tmp/bench   # also keep each script's JSON there

`make bench` calls this. Each script is its own process, so one figure's imports and caches do not touch the next.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("classify_vs_reembed", "embed_throughput", "search_latency")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--json-dir", default=None, help="write <script>.json here (the folder must exist)")
    parser.add_argument("--only", choices=SCRIPTS, action="append", help="run just this one (repeatable)")
    args = parser.parse_args()
    failed = []
    for name in args.only or SCRIPTS:
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if args.quick else [])]
        if args.json_dir:
            cmd += ["--json", str(Path(args.json_dir) / f"{name}.json")]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"=== {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
