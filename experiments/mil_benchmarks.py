"""The classic MIL benchmarks under their published protocol, with cytoretrieve's ABMIL.

    .venv/bin/python benchmarks/mil_benchmarks.py [--datasets musk1,fox] [--repeats 5] [--folds 10]
                                                  [--method abmil] [--epochs N] [--json out.json] [--markdown]
    .venv/bin/python benchmarks/mil_benchmarks.py --table a.json b.json     # the table of saved runs
    .venv/bin/python benchmarks/mil_benchmarks.py --table new*.json --against base*.json   # paired, fold by fold

Data: ../shared/data/mil-benchmarks/npz/{musk1,musk2,fox,tiger,elephant}.npz (see its SOURCE.md). Protocol: 10-fold
CV over bags (KFold, shuffled, repeat r seeded r) repeated 5 times = 50 folds; features standardised per fold on the
training bags' instances (then limited to +-5 std, `MILTrainConfig.clip`); accuracy at probability 0.5 on the test
bags, no validation; the model is `fit` with the `MILTrainConfig` defaults (one configuration for every dataset;
`--epochs` and `--set` override only for experiments). Two
spreads: the population std over the 50 fold accuracies, and the std over the 5 repeats of each repeat's 10-fold
mean (the one the published +- is closest to). Prints one line per dataset; `--markdown` also prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mil-benchmarks" / "npz"
DATASETS = ("musk1", "musk2", "fox", "tiger", "elephant")

# Ilse, Tomczak & Welling 2018, "Attention-based Deep Multiple Instance Learning" (ICML), Table 1, the "Attention"
# (abmil) and "Gated-Attention" (gated) rows, accuracy +- their spread. RECALLED, NOT VERIFIED: no copy of the paper
# was available when this was written, so BENCHMARKS.md treats the comparison as not made. Replace with the
# paper's table once checked. The targets are against the Attention row whichever pooling is measured.
PUBLISHED = {
    "abmil": {"musk1": (0.892, 0.040), "musk2": (0.858, 0.048), "fox": (0.615, 0.043),
              "tiger": (0.839, 0.022), "elephant": (0.868, 0.022)},
    "gated": {"musk1": (0.900, 0.050), "musk2": (0.863, 0.042), "fox": (0.603, 0.029),
              "tiger": (0.845, 0.018), "elephant": (0.857, 0.027)},
}
PUBLISHED_ABMIL = PUBLISHED["abmil"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--method", default="abmil")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--first-repeat", type=int, default=0, help="run repeats R.. (to split a run over processes)")
    ap.add_argument("--epochs", type=int, help="override the default epochs (experiments only)")
    ap.add_argument("--set", default="{}", help='other MILTrainConfig overrides as JSON, e.g. \'{"encoder": [128]}\'')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of saved --json runs")
    ap.add_argument("--against", nargs="+", metavar="JSON",
                    help="with --table: the paired difference to these saved runs, on the repeats both ran")
    args = ap.parse_args()
    if args.table:
        print(paired_from_json(args.table, args.against) if args.against else table_from_json(args.table))
        return

    import torch
    from mil_data import read_npz

    from cytoretrieve.queries.mil.evaluate import repeated_cv
    from cytoretrieve.queries.mil.train import MILTrainConfig

    torch.set_num_threads(args.threads)
    cfg = MILTrainConfig(method=args.method, device=args.device)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.set).items()}
    cfg = replace(cfg, **overrides, **({"epochs": args.epochs} if args.epochs else {}))
    out = {"config": cfg.to_dict(), "folds": args.folds, "repeats": args.repeats, "first_repeat": args.first_repeat,
           "results": {}}
    for name in args.datasets.split(","):
        bags = read_npz(DATA / f"{name}.npz")
        t0 = time.perf_counter()
        acc = np.concatenate([  # repeat r exactly as repeated_cv(repeats=5) runs it: KFold seed r, fold seeds 1000 r + f
            repeated_cv(bags, replace(cfg, seed=cfg.seed + 1000 * r), folds=args.folds, repeats=1, seed=r,
                        method=args.method) for r in range(args.first_repeat, args.first_repeat + args.repeats)])
        dt = time.perf_counter() - t0
        out["results"][name] = r = summary(acc, args.repeats)
        r.update(bags=len(bags), instances=bags.instances, seconds=dt)
        print(f"{name}: accuracy {r['accuracy_mean']:.3f}, std {r['accuracy_std']:.3f} over {len(acc)} folds, "
              f"{r['repeat_std']:.3f} over {args.repeats} repeats ({dt:.0f} s)", flush=True)
        if args.json:  # after every dataset: a stopped run keeps what it measured
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.markdown:
        print(markdown(out["results"], args.method))


def _repeats(paths: list[str], folds: int) -> dict[str, dict[int, np.ndarray]]:
    """dataset -> repeat -> its fold accuracies, from saved runs (split by dataset or by `--first-repeat`), all of
    `folds` folds (repeat r's splits are KFold(folds, seed r): the same folds, the same splits)."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for p in paths:
        run = json.loads(Path(p).read_text())
        if run["folds"] != folds:
            raise SystemExit(f"{p}: {run['folds']}-fold CV, not {folds}: not the same splits, nothing to pair")
        for name, r in run["results"].items():
            acc = np.asarray(r["accuracies"]).reshape(len(r["repeat_means"]), -1)
            for j, row in enumerate(acc):
                out.setdefault(name, {})[run.get("first_repeat", 0) + j] = row
    return out


def paired_from_json(paths: list[str], against: list[str]) -> str:
    """A configuration against a baseline, fold by fold: repeat r of both has the same splits (KFold seed r) and the
    same fold seeds, so the difference of two fold accuracies leaves out how hard that fold's split is. Per
    dataset, on the repeats both ran: both means and the mean difference +- its standard error over the folds."""
    folds = json.loads(Path(paths[0]).read_text())["folds"]
    new, base = _repeats(paths, folds), _repeats(against, folds)
    lines = ["| dataset | repeats | this | baseline | difference (points) +- SE |", "|---|---|---|---|---|"]
    for name in (k for k in DATASETS if k in new and k in base):
        reps = sorted(set(new[name]) & set(base[name]))
        a = np.concatenate([new[name][r] for r in reps])
        b = np.concatenate([base[name][r] for r in reps])
        d = 100 * (a - b)
        lines.append(f"| {name} | {len(reps)} | {a.mean():.3f} | {b.mean():.3f} | "
                     f"{d.mean():+.1f} +- {d.std(ddof=1) / len(d) ** 0.5:.1f} |")
    return "\n".join(lines)


def table_from_json(paths: list[str]) -> str:
    """The markdown table of saved runs of one configuration, split over processes by dataset or by repeats
    (`--first-repeat`): a dataset's repeats are joined in repeat order, its time is the sum of their times."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r.get("first_repeat", 0))
    parts: dict[str, list[dict]] = {}
    for run in runs:
        for name, r in run["results"].items():
            parts.setdefault(name, []).append(r)
    results = {}
    for name in (k for k in DATASETS if k in parts):
        acc = np.concatenate([np.asarray(r["accuracies"]) for r in parts[name]])
        first = parts[name][0]
        results[name] = {**summary(acc, sum(len(r["repeat_means"]) for r in parts[name])),
                         "bags": first["bags"], "instances": first["instances"],
                         "seconds": sum(r["seconds"] for r in parts[name])}
    return markdown(results, runs[0]["config"]["method"])


def summary(acc: np.ndarray, repeats: int) -> dict:
    """Mean accuracy, the population std over the folds, the std over the repeats' means, and the SEM."""
    per_repeat = acc.reshape(repeats, -1).mean(1)
    return {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
            "repeat_means": per_repeat.tolist(), "repeat_std": float(per_repeat.std()),
            "sem": float(acc.std(ddof=1) / len(acc) ** 0.5), "n_folds": len(acc), "accuracies": acc.tolist()}


def markdown(results: dict, method: str) -> str:
    """The BENCHMARKS.md table: ours against the recorded published figure, with the gap in points."""
    lines = ["| dataset | bags / instances | accuracy | std, 50 folds | std, 5 repeats | SEM | Ilse 2018 "
             f"({method}) | gap (points) | gap to Attention row | time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        pub, att = PUBLISHED.get(method, {}).get(name), PUBLISHED_ABMIL.get(name)
        pub_s = f"{pub[0]:.3f} +- {pub[1]:.3f}" if pub else "-"
        gap = f"{100 * (r['accuracy_mean'] - pub[0]):+.1f}" if pub else "-"
        lines.append(f"| {name} | {r['bags']} / {r['instances']} | {r['accuracy_mean']:.3f} | {r['accuracy_std']:.3f} | "
                     f"{r['repeat_std']:.3f} | {r['sem']:.3f} | {pub_s} | {gap} | "
                     f"{100 * (r['accuracy_mean'] - att[0]):+.1f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
