"""Two checkouts side by side: `embed`, `search` and `score` timed on the same data, alternating old and new tree in
fresh processes, so a code move (issue 22's reshape) can be shown to cost nothing.

Each round runs, once per tree, in a fresh process with that tree first on PYTHONPATH:
- embed: the real embedding job over `--images` Herlev cells (resnet18, random weights, 64 px, 0 workers) into a
  fresh store (seconds, inference included);
- search: `--queries` searches by stored id on that table after one warm-up (median ms per search);
- score: `cytoretrieve score --method mean` then `--method abmil`, 5 epochs each, as whole CLI processes over the same
  synthetic bag table (seconds each, imports included).
Rounds alternate the order (old-new, new-old, ...). Reported: the median of each figure per tree and new/old.

    .venv/bin/python benchmarks/shape_compare.py --old /tmp/oldtree --rounds 3 --json out/shape.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

ROOT = _common.ROOT

# An editable install's import hook comes before PYTHONPATH: drop it so that each run imports its own tree.
OWN_TREE = "import sys; sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"

EMBED_SEARCH = OWN_TREE + r"""
import json, sys, time, tempfile
from pathlib import Path
try:
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
except ImportError:  # the tree before the reshape
    from cytoretrieve.embed import embed
    from cytoretrieve.backbones import load_backbone
from cytoretrieve.queries.search import search
from cytoretrieve.store.tables import Store
src, n, queries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = Store(tempfile.mkdtemp())
backbone = load_backbone("resnet18", "random", image_size=64)
t = time.perf_counter()
report = embed(src, backbone, store, table="bench", workers=0, batch_size=64)
embed_s = time.perf_counter() - t
table = store.open("bench")
ids = table.vectors(["id"])[1].column("id").to_pylist()
search(table, row_id=ids[0], k=10)
times = []
for i in range(queries):
    t = time.perf_counter()
    search(table, row_id=ids[(i * 7) % len(ids)], k=10)
    times.append(time.perf_counter() - t)
times.sort()
import cytoretrieve
print(json.dumps({"tree": cytoretrieve.__file__, "embed_s": embed_s, "rows": report.added, "search_ms": 1000 * times[len(times) // 2]}))
"""


def _subset(herlev: Path, n: int, folder: Path) -> Path:
    """A class-folder copy (symlinks) of the first `n` Herlev cells, classes interleaved."""
    classes = sorted(p for p in herlev.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.jpg")) for c in classes]
    picked = [f for group in zip(*files) for f in group][:n]
    for f in picked:
        (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / f.parent.name / f.name).symlink_to(f)
    return folder


def _bag_store(folder: Path) -> tuple[str, Path, Path]:
    """A synthetic bag table (120 slides x 8-19 tiles of 64-d), its labels CSV and a 4-fold split, written once
    with the new tree; both trees read the same store."""
    import numpy as np

    from cytoretrieve.queries.mil.bags import Bags, bags_to_table, write_group_labels
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split
    from cytoretrieve.store.tables import Store

    rng = np.random.default_rng(0)
    names, y, vectors = [], [], []
    for i in range(120):
        x = rng.normal(size=(int(rng.integers(8, 20)), 64)).astype(np.float32)
        if i % 2:
            x[: int(rng.integers(1, 3)), 0] += 4.0
        names.append(f"slide-{i:03d}")
        y.append(i % 2)
        vectors.append(x)
    bags = Bags(names=names, y=np.array(y, dtype=np.int8), vectors=vectors)
    store = folder / "bags"
    bags_to_table(Store(store), "bags", bags)
    labels = write_group_labels(bags, folder / "labels.csv")
    split = write_split(make_split(read_labels(labels), folds=4, seed=0)[0], folder / "split.json")
    return str(store), labels, split


def _run(tree: Path, code_or_args: list[str]) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    import time

    t = time.perf_counter()
    out = subprocess.run([sys.executable, *code_or_args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(code_or_args[:3])} failed:\n{out.stderr[-2000:]}")
    return out.stdout, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the tree to compare against")
    ap.add_argument("--new", type=Path, default=ROOT, help="the tree under test (default: this checkout)")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    _common.print_machine(_common.machine())
    work = Path(tempfile.mkdtemp())
    cells = _subset(_common.HERLEV, args.images, work / "cells")
    bag_store, labels, split = _bag_store(work)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    figures: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            tree = trees[name]
            out, _ = _run(tree, ["-c", EMBED_SEARCH, str(cells), str(args.images), str(args.queries)])
            got = json.loads(out.strip().splitlines()[-1])
            if not got.pop("tree").startswith(str(tree)):
                raise SystemExit(f"the {name} run did not import its own tree ({tree}): check PYTHONPATH")
            for k, v in got.items():
                figures[name].setdefault(k, []).append(v)
            for method, extra in (("mean", ["--epochs", "5"]), ("abmil", ["--epochs", "5"])):
                argv = ["cytoretrieve", "score", "--tiles", "bags", "--store", bag_store, "--labels", str(labels),
                        "--split", str(split), "--method", method, *extra]
                code = OWN_TREE + f"import runpy; sys.argv = {argv!r}; runpy.run_module('cytoretrieve', run_name='__main__')"
                _, seconds = _run(tree, ["-c", code])
                figures[name].setdefault(f"score_{method}_s", []).append(seconds)
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in figures[name].items()), flush=True)
    summary = {name: {k: statistics.median(v) for k, v in f.items()} for name, f in figures.items()}
    print(f"\n{'figure':<18}{'old':>10}{'new':>10}{'new/old':>10}")
    for k in summary["new"]:
        if k == "rows":
            continue
        o, n = summary["old"][k], summary["new"][k]
        print(f"{k:<18}{o:>10.3f}{n:>10.3f}{n / o:>10.3f}")
    if args.json:
        _common.write_json(str(args.json), {"figures": figures, "median": summary, "load": _common.loadavg()})


if __name__ == "__main__":
    main()
