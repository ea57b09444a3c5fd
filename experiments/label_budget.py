"""Labels spent vs accuracy: does "next to review" (`labels suggest`) reach the all-labels k-NN F1 with fewer labels
than labelling rows in random order? Simulated expert = the true labels, on Herlev.

    .venv/bin/python experiments/label_budget.py [--seeds 4] [--round 20] [--start 0.05] [--k 10]
                                                 [--arch resnet18 --weights random --image-size 64] [--json out.json]

1. Embed the 917 Herlev cells once (`cytoretrieve.embed`, resnet18 with seeded random weights at 64 px by default)
   into a scratch store.
2. Per seed: a stratified 75 / 25 split (the `classify` protocol's train fraction). The 75% pool goes into a table
   of its own with no stored label (one table per seed and order), the 25% are the test cells.
   5% of the pool (random, seeded) is labelled first: expert events in the store's label log (`record_labels`).
3. Each round the expert labels `--round` more pool rows, chosen by
   - `suggest`: `cytoretrieve.queries.labels.suggest` (unreviewed rows by the margin of the weighted k-NN vote on
     the reviewed labels, least sure first), or
   - `random`: unreviewed rows in a seeded random order;
   the new events go into the log, and the reviewed labels are read back (`labelled_vectors(..., "reviewed")`).
4. After each round: weighted F1 on the test cells of the weighted k-NN vote (k = `--k`, T = 0.07) whose support
   is the reviewed pool rows. The reference: the same F1 with every pool row labelled.
5. Labels needed = the fewest labels after which the F1 comes within `--within` (1 point) of the reference, per
   seed; reported as mean over seeds per order, and the ratio suggest / random (target <= 1/3).

Default run: ~2-4 minutes on 2 cores (embedding ~30 s). Prints one line per order and seed and the summary;
`--json` keeps every curve.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERLEV = ROOT.parent / "shared" / "data" / "herlev_derived_jpg"
ORDERS = ("suggest", "random")


def embed_herlev(store, arch: str, weights: str, image_size: int):  # noqa: ANN001, ANN201 - Store -> (x, labels, map)
    import cytoretrieve

    model = cytoretrieve.load_backbone(arch, weights, image_size=image_size)
    report = cytoretrieve.embed(HERLEV, model, store, batch_size=64, workers=0, device="cpu")
    table = store.open(report.table)
    x, meta = table.vectors(["id", "label"])
    return x, np.array(meta.column("label").to_pylist(), dtype=object), table.labels


def pool_table(store, name: str, x: np.ndarray, label_map: dict):  # noqa: ANN001, ANN201 - a VectorTable
    """A table of the pool's vectors without stored labels (the label map kept: its classes are the known ones)."""
    table = store.create_or_open(name, {"arch": "herlev-pool", "fingerprint": name.ljust(64, "0"), "dim": x.shape[1]},
                                 {"name": name, "labels": label_map})
    table.add(table.make_rows([{"id": f"cell/{i}"} for i in range(len(x))], x))
    table.lease.release()
    return table


def test_f1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, classes: list[str],
            k: int) -> float:
    from cytoretrieve.queries.knn import confusions_per_k, knn_predict, weighted_f1

    codes = np.array([classes.index(c) for c in train_y])
    pred = knn_predict(train_x, codes, test_x, min(k, len(codes)), vote="weighted", temperature=0.07,
                       n_classes=len(classes))
    truth = np.array([classes.index(c) for c in test_y])
    return float(weighted_f1(confusions_per_k(truth, pred[:, None], len(classes)))[0])


def run_order(store, order: str, seed: int, pool_x: np.ndarray, pool_y: np.ndarray, test_x: np.ndarray,  # noqa: ANN001
              test_y: np.ndarray, label_map: dict, args: argparse.Namespace) -> dict:
    from cytoretrieve.queries.labels import labelled_vectors, suggest
    from cytoretrieve.store.labels import LabelInput, record_labels

    classes = list(label_map["classes"])
    table = pool_table(store, f"pool_s{seed}_{order}", pool_x, label_map)
    rng = np.random.default_rng(1000 + seed)
    order_rows = rng.permutation(len(pool_x))
    n0 = max(2, round(args.start * len(pool_x)))
    done: set[int] = set()

    def label(rows: list[int]) -> None:
        record_labels(store, table.name, [LabelInput(f"cell/{i}", pool_y[i]) for i in rows], reviewer="oracle")
        done.update(rows)

    label([int(i) for i in order_rows[:n0]])
    curve = []
    while True:
        x, meta, _ = labelled_vectors(table, ["id", "label"], "reviewed")
        keep = np.array([lab is not None for lab in meta.column("label").to_pylist()])
        y = np.array(meta.column("label").to_pylist(), dtype=object)[keep]
        curve.append({"labels": int(keep.sum()), "f1": test_f1(x[keep], y, test_x, test_y, classes, args.k)})
        left = len(pool_x) - len(done)
        if not left or (args.max_labels and len(done) >= args.max_labels):
            return {"order": order, "seed": seed, "curve": curve}
        n = min(args.round, left)
        if order == "suggest":
            picked = [int(s.id.split("/")[1]) for s in suggest(table, n, k=args.k).rows]
        else:
            picked = [int(i) for i in order_rows if int(i) not in done][:n]
        label(picked)


def labels_needed(curve: list[dict], target: float) -> int | None:
    return next((p["labels"] for p in curve if p["f1"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--round", type=int, default=20, help="Labels per round.")
    parser.add_argument("--start", type=float, default=0.05, help="Fraction of the pool labelled at the start.")
    parser.add_argument("--k", type=int, default=10, help="Neighbours of the vote (evaluation and suggestion).")
    parser.add_argument("--within", type=float, default=0.01, help="Come within this F1 of the all-labels F1.")
    parser.add_argument("--max-labels", type=int, default=0, help="Stop an order after this many labels (0: all).")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from sklearn.model_selection import train_test_split

    from cytoretrieve.store.tables import Store

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        store = Store(Path(scratch) / "store")
        x, y, label_map = embed_herlev(store, args.arch, args.weights, args.image_size)
        print(f"embedded {len(x)} Herlev cells ({args.arch} {args.weights} {args.image_size} px) in "
              f"{time.perf_counter() - started:.0f} s")
        runs, summary = [], {o: [] for o in ORDERS}
        for seed in range(args.seeds):
            pool, test = train_test_split(np.arange(len(x)), train_size=0.75, stratify=y, random_state=seed)
            full = test_f1(x[pool], y[pool], x[test], y[test], list(label_map["classes"]), args.k)
            for order in ORDERS:
                t0 = time.perf_counter()
                r = run_order(store, order, seed, x[pool], y[pool], x[test], y[test], label_map, args)
                r["all_labels_f1"] = full
                r["labels_needed"] = labels_needed(r["curve"], full - args.within)
                runs.append(r)
                summary[order].append(r["labels_needed"])
                print(f"seed {seed} {order:8s}: all-labels F1 {full:.3f} ({len(pool)} labels); start "
                      f"{r['curve'][0]['f1']:.3f} at {r['curve'][0]['labels']}; within {args.within:.2f} after "
                      f"{r['labels_needed']} labels; {len(r['curve']) - 1} rounds in {time.perf_counter() - t0:.0f} s")
    means = {o: float(np.mean([v if v is not None else np.nan for v in summary[o]])) for o in ORDERS}
    ratio = means["suggest"] / means["random"]
    print(f"labels needed to come within {args.within:.2f} of the all-labels F1, mean over {args.seeds} seeds: "
          f"suggest {means['suggest']:.0f}, random {means['random']:.0f}; ratio {ratio:.2f} (target <= 0.33)")
    for n in (50, 100, 200, 300):
        at = {o: np.mean([next((p["f1"] for p in r["curve"] if p["labels"] >= n), np.nan) for r in runs
                          if r["order"] == o]) for o in ORDERS}
        print(f"F1 at ~{n} labels: suggest {at['suggest']:.3f}, random {at['random']:.3f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "means": means,
                                         "ratio": ratio, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
