"""Appended rows -> searchable (issue 27: 100k rows appended to 10M, first answer <= 10 s), two trees on one table.

A table of `--rows` clustered vectors (`search_latency.ClusteredSource`) is written through the store API, its
FAISS index built and its similarity scale computed (one search); then `--append` rows are appended. Each round
runs one fresh process per tree (`--before DIR`: an exported older tree of the package, first on its path; the
checkout's tree otherwise) that times its first search after the append: opening the table, catching the cached
index up (the appended rows into the side index), the similarity scale, the search. Before every process the
side index and the scale are put back as the build left them, so each process does the whole catch-up itself.

    git archive 9de54f8 cytoretrieve | tar -x -C /tmp/old
    .venv/bin/python benchmarks/append_catch_up.py --rows 2000000 --append 100000 --before /tmp/old --rounds 2
    .venv/bin/python benchmarks/append_catch_up.py --store /work/bench10m/store --before /tmp/old --rounds 1
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

import _common
import numpy as np
from search_latency import ClusteredSource, make_table_streamed

# An editable install's import hook comes before PYTHONPATH: drop it so that each run imports its own tree.
OWN_TREE = "import sys; sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"

FIRST = OWN_TREE + """
import json, sys, time
from cytoretrieve.queries.search import search
from cytoretrieve.store.tables import Store
t0 = time.perf_counter()
hit = search(Store(sys.argv[1]).open(sys.argv[2]), row_id=sys.argv[3], k=10, device="cpu")
import cytoretrieve
print(json.dumps({"first_s": time.perf_counter() - t0, "hits": len(hit.hits), "tree": cytoretrieve.__file__}))
"""


def first_search(tree: Path | None, store: str, table: str, row_id: str) -> float:
    """Seconds to the first answer in a fresh process importing `tree` (None: the checkout's tree)."""
    env = None if tree is None else {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", FIRST if tree is not None else FIRST.replace(OWN_TREE, ""),
                           store, table, row_id], capture_output=True, text=True, env=env, cwd="/tmp")
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if tree is not None and not out["tree"].startswith(str(tree)):
        raise RuntimeError(f"the process imported {out['tree']}, not the tree in {tree}")
    return out["first_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--append", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--before", type=Path, help="an exported older tree (the folder holding its cytoretrieve/)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--store", type=Path, help="a kept store of `search_latency.py --store` (its table, index and "
                    "appended rows as they are) instead of a new table")
    ap.add_argument("--json")
    args = ap.parse_args()
    info = _common.machine()
    _common.print_machine(info)
    from cytoretrieve.queries.search import search
    from cytoretrieve.store.index import table_index
    from cytoretrieve.store.tables import Store

    with tempfile.TemporaryDirectory(prefix="cytoretrieve-append-") as tmp:
        store = Store(args.store or Path(tmp) / "store")
        name = f"synthetic_{args.dim}"
        if args.store:  # a kept store of `search_latency.py --store`: its index as it is, its rows since appended
            held = store.open(name).count()
            print(f"{held} rows in the kept store; the index as cached there")
        else:
            table, ingest_s = make_table_streamed(store, name, ClusteredSource(args.rows, args.dim))
            start = time.perf_counter()
            table_index(table, "ivfpq")
            search(table, row_id="c0000000", k=10, device="cpu")  # the scale of the built index
            print(f"{args.rows} rows written in {ingest_s:.1f} s; index (ivfpq) and scale in "
                  f"{time.perf_counter() - start:.1f} s")
        built = {p: p.read_bytes() for p in store.index_dir().glob(f"{name}.*") if ".side" not in p.name
                 and p.suffix == ".json"}  # the index's .json and the scale, as the build left them
        if not args.store:
            _, append_s = make_table_streamed(store, name, ClusteredSource(args.rows + args.append, args.dim),
                                              args.rows, args.append)
            print(f"{args.append} rows appended in {append_s:.1f} s")
            held = args.rows + args.append
        last = f"c{held - 1:07d}"
        trees = {"before": args.before, "after": None} if args.before else {"after": None}
        times: dict[str, list[float]] = {k: [] for k in trees}
        for r in range(args.rounds):
            for label, tree in trees.items():
                for p in store.index_dir().glob(f"{name}.*"):
                    if ".side" in p.name or p.name.endswith(".nnsim.json"):
                        p.unlink()
                for p, data in built.items():
                    p.write_bytes(data)
                times[label].append(first_search(tree, store.uri, name, last))
                print(f"round {r + 1} {label}: first search after the append {times[label][-1]:.2f} s", flush=True)
        if not args.store:
            shutil.rmtree(Path(tmp) / "store", ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print("median: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items())
          + (f"; before / after {med['before'] / med['after']:.1f}x" if "before" in med else ""))
    info["loadavg_end"] = _common.print_load("at the end")
    _common.write_json(args.json, {"machine": info, "rows": args.rows, "append": args.append, "seconds": times,
                                   "median": med})


if __name__ == "__main__":
    main()
