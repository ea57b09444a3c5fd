"""Labels spent vs accuracy: does "next to review" (`labels suggest`) reach the all-labels k-NN F1 with fewer labels
than labelling rows in random order? Simulated expert = the true labels, on Herlev.

    .venv/bin/python experiments/label_budget.py [--seeds 4] [--round 20] [--start 0.05] [--k 10]
                                                 [--arch resnet18 --weights random|FILE --image-size 64]
                                                 [--features backbone|pixels] [--centre] [--cache vectors.npz]
                                                 [--orders suggest random density diverse coverage] [--json out.json]

1. Embed the 917 Herlev cells once (`cytoretrieve.embed`, resnet18 with seeded random weights at 64 px by default;
   `--weights FILE`: an exported checkpoint, e.g. a DINO teacher) into a scratch store, or `--features pixels`: each
   image resized to 32 x 32 RGB, flattened. `--centre` subtracts the pool's mean vector (per seed, from the pool
   only) from pool and test vectors: ReLU-pooled CNN features and raw pixels share a large common component that
   cosine k-NN otherwise mostly compares.
2. Per seed: a stratified 75 / 25 split (the `classify` protocol's train fraction). The 75% pool goes into a table
   of its own with no stored label (one table per seed and order), the 25% are the test cells.
   5% of the pool (random, seeded) is labelled first: expert events in the store's label log (`record_labels`).
3. Each round the expert labels `--round` more pool rows, chosen by
   - `suggest`: `cytoretrieve.queries.review_queue.suggest` (unreviewed rows by the margin of the weighted k-NN vote on
     the reviewed labels, least sure first); the new events go into the log, and the reviewed labels are read back
     (`labelled_vectors(..., "reviewed")`): the product's path end to end;
   - `random`: unreviewed rows in a seeded random order;
   and, as candidates for a better "next to review" (computed here in numpy from the pool alone: its vectors, the
   labels given so far; never the test cells):
   - `density`: the margin weighted by how typical a row is: (1 - margin) x the rank (0-1] of its density, the mean
     cosine similarity to its 10 nearest pool rows (information density: an unsure outlier teaches little);
   - `diverse`: the 5 x `--round` least sure rows, clustered (k-means, `--round` clusters), the least sure of each
     cluster (no batch of near-duplicates);
   - `coverage`: the pool clustered (k-means) into (labelled + `--round`) clusters, capped at 200; the most typical
     row of each cluster holding no labelled row yet, largest clusters first; the rest by margin (TypiClust-like:
     cover the pool first, then refine the boundaries).
4. After each round: weighted F1 on the test cells of the weighted k-NN vote (k = `--k`, T = 0.07) whose support
   is the reviewed pool rows. The reference: the same F1 with every pool row labelled.
5. Labels needed = the fewest labels after which the F1 comes within `--within` (1 point) of the reference, per
   seed; reported as mean over seeds per order, and each order's ratio to random (target for suggest <= 1/3).

Default run: ~2-4 minutes on 2 cores when quiet (embedding ~30-90 s; `--cache` keeps the vectors for the next
run); the candidate orders add seconds each. Prints one line per order and seed and the summary; `--json` keeps
every curve.
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
ORDERS = ("suggest", "random", "density", "diverse", "coverage")
TEMPERATURE = 0.07


def embed_herlev(store, arch: str, weights: str, image_size: int):  # noqa: ANN001, ANN201 - Store -> (x, labels, map)
    """The Herlev cells' vectors and labels in id order, and the table's label map."""
    import cytoretrieve

    model = cytoretrieve.load_backbone(arch, weights, image_size=image_size)
    report = cytoretrieve.embed(HERLEV, model, store, batch_size=64, workers=0, device="cpu")
    table = store.open(report.table)
    x, meta = table.vectors(["id", "label"])
    order = np.argsort(np.array(meta.column("id").to_pylist()))
    return x[order], np.array(meta.column("label").to_pylist(), dtype=object)[order], table.labels


def pixel_vectors(size: int = 32):  # noqa: ANN201 - (x, labels, map)
    """Each Herlev image resized to size x size RGB (bilinear), flattened; the dataset's label map."""
    from PIL import Image

    from cytoretrieve.sources.cells import open_dataset

    ds = open_dataset(HERLEV)
    records = sorted(ds.records, key=lambda r: r.id)
    x = np.stack([np.asarray(Image.open(r.path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                             dtype=np.float32).ravel() for r in records])
    classes = list(dict.fromkeys(sorted(r.label for r in records)))
    return x, np.array([r.label for r in records], dtype=object), {"classes": classes, "binary": {}, "names": {}}


def features(store, args: argparse.Namespace):  # noqa: ANN001, ANN201 - (x, labels, map)
    """The vectors the experiment runs on (`--features`), kept in / read from `--cache`."""
    if args.cache and args.cache.exists():
        f = np.load(args.cache, allow_pickle=True)
        return f["x"], f["y"], json.loads(str(f["label_map"]))
    if args.features == "pixels":
        x, y, label_map = pixel_vectors()
    else:
        x, y, label_map = embed_herlev(store, args.arch, args.weights, args.image_size)
    if args.cache:
        np.savez(args.cache, x=x, y=y, label_map=json.dumps(label_map))
    return x, y, label_map


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
    pred = knn_predict(train_x, codes, test_x, min(k, len(codes)), vote="weighted", temperature=TEMPERATURE,
                       n_classes=len(classes))
    truth = np.array([classes.index(c) for c in test_y])
    return float(weighted_f1(confusions_per_k(truth, pred[:, None], len(classes)))[0])


def margins(xn: np.ndarray, known: np.ndarray, codes: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    """The margin of the weighted k-NN vote on the labelled rows, for every unlabelled row (as `suggest`)."""
    from cytoretrieve.queries.knn import vote_margin
    from cytoretrieve.store.ann import exact_neighbours

    refs, queries = np.flatnonzero(known), np.flatnonzero(~known)
    sims, idx = exact_neighbours(xn[refs], xn[queries], min(k, len(refs)))
    return vote_margin(codes[refs][idx], sims, n_classes, "weighted", TEMPERATURE)[1]


def density(xn: np.ndarray, m: int = 10) -> np.ndarray:
    """Mean cosine similarity of each row to its m nearest other rows."""
    from cytoretrieve.store.ann import exact_neighbours

    sims, _ = exact_neighbours(xn, xn, m + 1)
    return sims[:, 1:].mean(1)


def kmeans_labels(x: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    from cytoretrieve.store.ann import kmeans

    index = kmeans(np.ascontiguousarray(x, np.float32), clusters, niter=20, seed=seed, min_points_per_centroid=1)
    return index.search(np.ascontiguousarray(x, np.float32), 1)[1][:, 0]


def pick(order: str, n: int, xn: np.ndarray, known: np.ndarray, codes: np.ndarray, n_classes: int, k: int,
         dens_rank: np.ndarray, seed: int) -> list[int]:
    """The next `n` pool rows of a candidate strategy (see the module docstring), from the pool alone."""
    queries = np.flatnonzero(~known)
    margin = margins(xn, known, codes, n_classes, k)
    if order == "density":
        return [int(q) for q in queries[np.argsort(-(1 - margin) * dens_rank[queries], kind="stable")[:n]]]
    if order == "diverse":
        cand = np.argsort(margin, kind="stable")[:5 * n]
        if len(cand) <= n:
            return [int(q) for q in queries[cand]]
        groups = kmeans_labels(xn[queries[cand]], n, seed)
        best = {}
        for c, g in zip(cand, groups):  # cand is least sure first: the first of each group is its least sure
            best.setdefault(int(g), int(queries[c]))
        chosen = list(best.values())
        rest = [int(queries[c]) for c in cand if int(queries[c]) not in set(chosen)]
        return (chosen + rest)[:n]
    if order == "coverage":
        clusters = min(int(known.sum()) + n, 200, len(xn))
        groups = kmeans_labels(xn, clusters, seed)
        covered = set(groups[known].tolist())
        sizes = np.bincount(groups, minlength=clusters)
        chosen: list[int] = []
        for g in np.argsort(-sizes, kind="stable"):
            if len(chosen) == n:
                break
            members = np.flatnonzero((groups == g) & ~known)
            if int(g) in covered or not len(members):
                continue
            chosen.append(int(members[np.argmax(dens_rank[members])]))
        taken = set(chosen)
        rest = [int(q) for q in queries[np.argsort(margin, kind="stable")] if int(q) not in taken]
        return (chosen + rest)[:n]
    raise ValueError(order)


def run_order(store, order: str, seed: int, pool_x: np.ndarray, pool_y: np.ndarray, test_x: np.ndarray,  # noqa: ANN001
              test_y: np.ndarray, label_map: dict, args: argparse.Namespace) -> dict:
    from cytoretrieve.queries.labels import labelled_vectors
    from cytoretrieve.queries.review_queue import suggest
    from cytoretrieve.store.ann import l2_normalise
    from cytoretrieve.store.labels import LabelInput, record_labels

    classes = list(label_map["classes"])
    table = pool_table(store, f"pool_s{seed}_{order}", pool_x, label_map) if order == "suggest" else None
    rng = np.random.default_rng(1000 + seed)
    order_rows = rng.permutation(len(pool_x))
    n0 = max(2, round(args.start * len(pool_x)))
    done: set[int] = set()
    xn = l2_normalise(pool_x.astype(np.float32))
    dens = density(xn) if order in ("density", "coverage") else None
    dens_rank = None if dens is None else (np.argsort(np.argsort(dens)) + 1) / len(dens)

    def label(rows: list[int]) -> None:
        if table is not None:
            record_labels(store, table.name, [LabelInput(f"cell/{i}", pool_y[i]) for i in rows], reviewer="oracle")
        done.update(rows)

    label([int(i) for i in order_rows[:n0]])
    curve = []
    while True:
        if table is not None:  # the product's path: the reviewed labels read back from the store
            x, meta, _ = labelled_vectors(table, ["id", "label"], "reviewed")
            keep = np.array([lab is not None for lab in meta.column("label").to_pylist()])
            y = np.array(meta.column("label").to_pylist(), dtype=object)[keep]
            x = x[keep]
        else:
            rows = sorted(done)
            x, y = pool_x[rows], pool_y[rows]
        curve.append({"labels": len(y), "f1": test_f1(x, y, test_x, test_y, classes, args.k)})
        left = len(pool_x) - len(done)
        if not left or (args.max_labels and len(done) >= args.max_labels):
            return {"order": order, "seed": seed, "curve": curve}
        n = min(args.round, left)
        if order == "suggest":
            picked = [int(s.id.split("/")[1]) for s in suggest(table, n, k=args.k).rows]
        elif order == "random":
            picked = [int(i) for i in order_rows if int(i) not in done][:n]
        else:
            known = np.zeros(len(pool_x), bool)
            known[list(done)] = True
            seen = sorted({pool_y[i] for i in done})
            codes = np.array([seen.index(c) if c in seen else -1 for c in pool_y])
            picked = pick(order, n, xn, known, codes, len(seen), args.k, dens_rank, 1000 * seed + len(done))
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
    parser.add_argument("--features", choices=("backbone", "pixels"), default="backbone")
    parser.add_argument("--centre", action="store_true", help="Subtract the pool's mean vector (pool and test).")
    parser.add_argument("--cache", type=Path, default=None, help="An .npz keeping the vectors for the next run.")
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=["suggest", "random"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    orders = list(args.orders)

    from sklearn.model_selection import train_test_split

    from cytoretrieve.store.tables import Store

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        store = Store(Path(scratch) / "store")
        x, y, label_map = features(store, args)
        what = "32 x 32 RGB pixels" if args.features == "pixels" else \
            f"{args.arch} {args.weights} {args.image_size} px"
        print(f"{len(x)} Herlev cells ({what}{', centred on the pool' if args.centre else ''}) in "
              f"{time.perf_counter() - started:.0f} s")
        runs, summary = [], {o: [] for o in orders}
        for seed in range(args.seeds):
            pool, test = train_test_split(np.arange(len(x)), train_size=0.75, stratify=y, random_state=seed)
            shift = x[pool].mean(0, keepdims=True) if args.centre else 0.0
            pool_x, test_x = x[pool] - shift, x[test] - shift
            full = test_f1(pool_x, y[pool], test_x, y[test], list(label_map["classes"]), args.k)
            for order in orders:
                t0 = time.perf_counter()
                r = run_order(store, order, seed, pool_x, y[pool], test_x, y[test], label_map, args)
                r["all_labels_f1"] = full
                r["labels_needed"] = labels_needed(r["curve"], full - args.within)
                runs.append(r)
                summary[order].append(r["labels_needed"])
                print(f"seed {seed} {order:8s}: all-labels F1 {full:.3f} ({len(pool)} labels); start "
                      f"{r['curve'][0]['f1']:.3f} at {r['curve'][0]['labels']}; within {args.within:.2f} after "
                      f"{r['labels_needed']} labels; {len(r['curve']) - 1} rounds in {time.perf_counter() - t0:.0f} s")
    means = {o: float(np.mean([v if v is not None else np.nan for v in summary[o]])) for o in orders}
    base = means.get("random", np.nan)
    ratios = {o: means[o] / base for o in orders}
    print(f"labels needed to come within {args.within:.2f} of the all-labels F1, mean over {args.seeds} seeds "
          f"(ratio to random; target <= 0.33): " + ", ".join(f"{o} {means[o]:.0f} ({ratios[o]:.2f})" for o in orders))
    for n in (50, 100, 200, 300):
        at = {o: np.mean([next((p["f1"] for p in r["curve"] if p["labels"] >= n), np.nan) for r in runs
                          if r["order"] == o]) for o in orders}
        print(f"F1 at ~{n} labels: " + ", ".join(f"{o} {at[o]:.3f}" for o in orders))
    ratio = ratios.get("suggest", np.nan)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "means": means,
                                         "ratio": ratio, "ratios": ratios, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
