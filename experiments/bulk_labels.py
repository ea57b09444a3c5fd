"""Labels per bulk action on Herlev neighbourhoods: a bound on how much faster labelling a cell's neighbours in one
action is than labelling cells one by one.

    .venv/bin/python experiments/bulk_labels.py [--k 5 10 20] [--radius 0.02 0.05 0.1]
                                                [--arch resnet18 --weights random --image-size 64] [--centre]
                                                [--tsne] [--cache vectors.npz]
                                                [--json out.json]

1. Embed the 917 Herlev cells (`cytoretrieve.embed`, the label-budget experiment's backbone by default: resnet18 with
   seeded random weights at 64 px; `--weights FILE` for a trained one, e.g. an exported DINO teacher) into a scratch
   store; `--centre` subtracts the mean vector first (ReLU-pooled CNN features share a large common component).
2. **Neighbours** (the viewer's "select the hits, one key"): for each cell, its k nearest other cells by cosine
   similarity (the store's search). `same` = how many of them share the cell's class. If the reviewer labels the
   cell and its k neighbours with one key and un-selects the others for free, one action gives 1 + `same` correct
   labels: the upper bound. If instead each wrong one costs an action to fix, the net labels per action over all
   cells is sum(1 + k) / sum(1 + k - same).
3. **Lasso** (the viewer's 2-D map, PCA as `store.maps` computes it, scaled into [0, 1] per axis; `--tsne` adds the
   t-SNE map): for each cell, the disc of radius r around it on the map. Points inside, the share of the cell's
   class among them, and the same two per-action figures (1 + same, and sum(1 + n) / sum(1 + n - same)).
4. The same for the binary task (normal vs abnormal, Herlev's `binary`), where a bulk action needs only agree on
   normal / abnormal.

Prints one table per task; `--json` keeps the distributions. Takes ~1 minute on 2 cores (embedding ~30-60 s).
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


def embed(arch: str, weights: str, image_size: int, cache: Path | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, class labels, binary labels) of the 917 Herlev cells, in id order; kept in / read from `cache`
    (an .npz) when given, so that several runs over the same features embed once."""
    if cache is not None and cache.exists():
        f = np.load(cache, allow_pickle=True)
        return f["x"], f["y"], f["binary"]
    import cytoretrieve
    from cytoretrieve.store.tables import Store

    with tempfile.TemporaryDirectory() as scratch:
        store = Store(Path(scratch) / "store")
        model = cytoretrieve.load_backbone(arch, weights, image_size=image_size)
        report = cytoretrieve.embed(HERLEV, model, store, batch_size=64, workers=0, device="cpu")
        x, meta = store.open(report.table).vectors(["id", "label", "binary"])
    order = np.argsort(np.array(meta.column("id").to_pylist()))
    out = (x[order], np.array(meta.column("label").to_pylist(), dtype=object)[order],
           np.array(meta.column("binary").to_pylist())[order])
    if cache is not None:
        np.savez(cache, x=out[0], y=out[1], binary=out[2])
    return out


def knn_same(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """For each row, how many of its k nearest other rows (cosine) share its label."""
    from cytoretrieve.store.ann import exact_neighbours, l2_normalise

    xn = l2_normalise(x.astype(np.float32))
    _, idx = exact_neighbours(xn, xn, k + 1)
    rows = np.arange(len(x))[:, None]
    own = idx == rows
    keep = np.argsort(own, axis=1, kind="stable")[:, :k]  # the row itself sorted last, then cut off
    idx = np.take_along_axis(idx, keep, 1)
    return (y[idx] == y[:, None]).sum(1)


def map_2d(x: np.ndarray, method: str) -> np.ndarray:
    """The viewer's map of these vectors (`store.maps`' registry), scaled into [0, 1] per axis."""
    from cytoretrieve.store.maps import MAP_METHODS

    xy = np.asarray(MAP_METHODS[method].fit(x.astype(np.float32)), np.float64)
    lo, hi = xy.min(0), xy.max(0)
    return (xy - lo) / np.where(hi > lo, hi - lo, 1.0)


def disc_counts(xy: np.ndarray, y: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """For each point: the other points within `radius` on the map, and how many of them share its label."""
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    inside = d2 <= radius ** 2
    np.fill_diagonal(inside, False)
    return inside.sum(1), (inside & (y[None, :] == y[:, None])).sum(1)


def summary(n: np.ndarray, same: np.ndarray) -> dict:
    """Per-action figures over all cells: neighbours, same-class share, 1 + same (bound), net with fixes."""
    n, same = np.asarray(n, float), np.asarray(same, float)
    share = np.divide(same, n, out=np.ones_like(same), where=n > 0)
    net = (1 + n).sum() / (1 + n - same).sum()  # all cells' labels over all the actions they took
    return {"n_mean": float(n.mean()), "same_mean": float(same.mean()), "share_mean": float(share.mean()),
            "share_q": [float(q) for q in np.quantile(share, [0.1, 0.25, 0.5, 0.75, 0.9])],
            "all_same": float((same == n).mean()), "bound_mean": float((1 + same).mean()),
            "net": float(net), "hist_same": np.bincount(same.astype(int)).tolist()}


def row(name: str, s: dict) -> str:
    q = s["share_q"]
    return (f"| {name} | {s['n_mean']:.1f} | {s['same_mean']:.2f} | {s['share_mean']:.2f} "
            f"({q[0]:.2f} / {q[2]:.2f} / {q[4]:.2f}) | {s['all_same']:.2f} | {s['bound_mean']:.2f} | "
            f"{s['net']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--radius", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--centre", action="store_true", help="Subtract the mean vector before the neighbours.")
    parser.add_argument("--tsne", action="store_true", help="Also the t-SNE map's discs.")
    parser.add_argument("--cache", type=Path, default=None, help="An .npz keeping the embedded vectors.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    t0 = time.perf_counter()
    x, y, binary = embed(args.arch, args.weights, args.image_size, args.cache)
    if args.centre:
        x = x - x.mean(0, keepdims=True)
    print(f"embedded {len(x)} Herlev cells ({args.arch}, weights {args.weights}, {args.image_size} px"
          f"{', centred' if args.centre else ''}) in {time.perf_counter() - t0:.0f} s")
    maps = {m: map_2d(x, m) for m in (("pca", "tsne") if args.tsne else ("pca",))}
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cells": len(x), "tasks": {}}
    header = ("| selection | cells in it | same class | share same (p10 / p50 / p90) | all same | "
              "labels per action, bound (1 + same) | net, one fix per wrong |\n|---|---|---|---|---|---|---|")
    for task, labels in (("7 classes", y), ("binary", binary)):
        results = {}
        for k in args.k:
            results[f"{k} nearest"] = summary(np.full(len(x), k), knn_same(x, labels, k))
        for method, xy in maps.items():
            for r in args.radius:
                results[f"{method} disc r={r}"] = summary(*disc_counts(xy, labels, r))
        out["tasks"][task] = results
        print(f"\n{task}:\n{header}")
        for name, s in results.items():
            print(row(name, s))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
