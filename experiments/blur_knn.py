"""What synthetic defocus costs the Herlev k-NN, and what the focus filter (`--where "focus > t"`) wins back.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python experiments/blur_knn.py [--sigmas 2 4 8] [--fraction 0.3]
        [--seeds 5] [--k 10] [--arch resnet18 --weights random --image-size 64] [--json out.json]

1. Every one of the 917 Herlev cells (../shared/data/herlev_derived_jpg, read by `open_dataset`) is embedded
   sharp and after a Gaussian blur of each `--sigmas` (px of the source image, ~200 px a side; the model sees
   them at `--image-size`), through the backbone's own preprocessing (letterbox) and `models.inference.forward`;
   each version gets its focus score (`sources.slides.focus.focus_score`, what `tile` / `cells` store).
2. Per seed and strength: `--fraction` of the cells (random, seeded) are the blurred ones; a stratified 75 / 25
   split (seeded, the `classify` protocol's train fraction); the weighted k-NN vote (k = `--k`, T = 0.07, as
   `classify --vote weighted`) of every test cell over the training cells; weighted F1 over the test cells in
   - `clean`: no cell blurred (the reference),
   - `blurred`: the blurred cells in both reference and queries, no filter,
   - `filtered`: training rows below a focus threshold dropped from the reference (what `search` / `classify`
     with `--where "focus > t"` do); the queries are all test cells, so the F1 is over the same cells as
     `blurred`. The threshold is chosen on the training rows only: among 0 (no filter) and the 5th, 10th, ...,
     50th percentiles of their focus scores, the best 5-fold cross-validated weighted F1 (the reference of each
     fold filtered, its queries not), ties to the lower threshold.
   Also reported: `filtered` F1 on the test cells the threshold keeps (a QC gate that refuses blurred queries),
   with the share of test cells kept, and the share of blurred / sharp training rows dropped.
3. Mean +- std over seeds, and the paired difference filtered - blurred (mean +- standard error, seeds won).

Seeds vary which cells are blurred and the split; the backbone is the same (seeded random init unless
`--weights`). Prints a table; `--json` keeps every run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERLEV = ROOT.parent / "shared" / "data" / "herlev_derived_jpg"
PERCENTILES = (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50)
TEMPERATURE = 0.07


def load_cells(root: Path) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """(RGB arrays, class codes, class names) of a cell dataset, read with the package's own reader."""
    from PIL import Image

    from cytoretrieve.models.preprocess import to_rgb
    from cytoretrieve.sources.cells import open_dataset

    dataset = open_dataset(root)
    classes = sorted({r.label for r in dataset.records})
    images = []
    for r in dataset.records:
        with Image.open(r.path) as im:
            images.append(np.asarray(to_rgb(im)))
    return images, np.array([classes.index(r.label) for r in dataset.records]), classes


def blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    if sigma <= 0:
        return rgb
    return np.clip(ndimage.gaussian_filter(rgb.astype(np.float32), (sigma, sigma, 0), mode="reflect"), 0, 255
                   ).round().astype(np.uint8)


def embed_arrays(backbone, images: list[np.ndarray], batch: int = 64) -> np.ndarray:  # noqa: ANN001 - a Backbone
    import torch
    from PIL import Image

    from cytoretrieve.models.inference import forward, prepare

    model = prepare(backbone, "cpu")
    out = []
    for i in range(0, len(images), batch):
        tensors = [backbone.preprocessing(Image.fromarray(a)) for a in images[i:i + batch]]
        out.append(forward(model, torch.stack(tensors), "cpu"))
    return np.concatenate(out)


def focus_scores(images: list[np.ndarray]) -> np.ndarray:
    """Focus score per image; NaN where it has too little stain (null in a table: never filtered out)."""
    from cytoretrieve.sources.slides.focus import focus_score

    return np.array([np.nan if (f := focus_score(a)) is None else f for a in images], dtype=np.float64)


def f1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, n_classes: int,
       k: int) -> float:
    from cytoretrieve.queries.knn import confusions_per_k, knn_predict, weighted_f1

    pred = knn_predict(train_x, train_y, test_x, min(k, len(train_y)), vote="weighted", temperature=TEMPERATURE,
                       n_classes=n_classes)
    return float(weighted_f1(confusions_per_k(test_y, pred[:, None], n_classes))[0])


def keep(focus: np.ndarray, threshold: float) -> np.ndarray:
    """Rows a `focus > threshold` filter keeps; a null score (NaN) is kept (nothing to judge), threshold 0 keeps all."""
    return (focus > threshold) | np.isnan(focus) | (threshold <= 0)


def choose_threshold(x: np.ndarray, y: np.ndarray, focus: np.ndarray, n_classes: int, k: int, seed: int) -> float:
    """The focus threshold with the best 5-fold CV weighted F1 on these (training) rows; ties to the lower one."""
    from sklearn.model_selection import StratifiedKFold

    finite = focus[np.isfinite(focus)]
    candidates = sorted({0.0, *(float(np.percentile(finite, p)) for p in PERCENTILES if p > 0)})
    folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y))
    best, best_t = -1.0, 0.0
    for t in candidates:
        scores = []
        for tr, va in folds:
            ref = tr[keep(focus[tr], t)]
            scores.append(f1(x[ref], y[ref], x[va], y[va], n_classes, k))
        score = float(np.mean(scores))
        if score > best + 1e-12:
            best, best_t = score, t
    return best_t


def run_seed(seed: int, sigma_index: int, vectors: list[np.ndarray], focus: list[np.ndarray], y: np.ndarray,
             n_classes: int, args: argparse.Namespace) -> dict:
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    n = len(y)
    blurred = np.zeros(n, bool)
    blurred[rng.choice(n, round(args.fraction * n), replace=False)] = True
    train, test = train_test_split(np.arange(n), train_size=0.75, stratify=y, random_state=seed)
    sharp_x, sharp_f = vectors[0], focus[0]
    x = np.where(blurred[:, None], vectors[sigma_index], sharp_x)
    fs = np.where(blurred, focus[sigma_index], sharp_f)
    clean = f1(sharp_x[train], y[train], sharp_x[test], y[test], n_classes, args.k)
    plain = f1(x[train], y[train], x[test], y[test], n_classes, args.k)
    t = choose_threshold(x[train], y[train], fs[train], n_classes, args.k, seed)
    ref = train[keep(fs[train], t)]
    filtered = f1(x[ref], y[ref], x[test], y[test], n_classes, args.k)
    gate = test[keep(fs[test], t)]
    gated = f1(x[ref], y[ref], x[gate], y[gate], n_classes, args.k) if len(gate) else float("nan")
    dropped = ~keep(fs[train], t)
    return {"seed": seed, "sigma": args.sigmas[sigma_index - 1], "clean": clean, "blurred": plain,
            "filtered": filtered, "threshold": t, "gated": gated, "test_kept": len(gate) / len(test),
            "blurred_train_dropped": float(dropped[blurred[train]].mean()) if blurred[train].any() else 0.0,
            "sharp_train_dropped": float(dropped[~blurred[train]].mean())}


def summarise(runs: list[dict], sigma: float) -> dict:
    rs = [r for r in runs if r["sigma"] == sigma]
    out = {"sigma": sigma, "seeds": len(rs)}
    for key in ("clean", "blurred", "filtered", "gated", "test_kept", "threshold", "blurred_train_dropped",
                "sharp_train_dropped"):
        v = np.array([r[key] for r in rs], dtype=float)
        out[key] = [float(np.nanmean(v)), float(np.nanstd(v))]
    d = np.array([r["filtered"] - r["blurred"] for r in rs])
    out["filtered_minus_blurred"] = [float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
                                     int((d > 0).sum())]
    c = np.array([r["clean"] - r["blurred"] for r in rs])
    out["clean_minus_blurred"] = [float(c.mean()), float(c.std(ddof=1) / np.sqrt(len(c))) if len(c) > 1 else 0.0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[2.0, 4.0, 8.0],
                        help="Gaussian blur sigmas, px of the source image (three strengths).")
    parser.add_argument("--fraction", type=float, default=0.3, help="Share of the cells blurred.")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import cytoretrieve

    started = time.perf_counter()
    images, y, classes = load_cells(HERLEV)
    backbone = cytoretrieve.load_backbone(args.arch, args.weights, image_size=args.image_size)
    vectors, focus = [], []
    for sigma in [0.0, *args.sigmas]:
        t0 = time.perf_counter()
        versions = [blur(a, sigma) for a in images]
        vectors.append(embed_arrays(backbone, versions))
        focus.append(focus_scores(versions))
        f = focus[-1]
        print(f"sigma {sigma:g}: embedded {len(versions)} cells in {time.perf_counter() - t0:.0f} s; focus median "
              f"{np.nanmedian(f):.3f} (5-95%: {np.nanpercentile(f, 5):.3f}-{np.nanpercentile(f, 95):.3f}), "
              f"{int(np.isnan(f).sum())} null", flush=True)
    runs = [run_seed(seed, i + 1, vectors, focus, y, len(classes), args)
            for i in range(len(args.sigmas)) for seed in range(args.seeds)]
    summary = [summarise(runs, s) for s in args.sigmas]
    print(f"\nHerlev k-NN (weighted vote, k {args.k}), {args.arch} {args.weights} {args.image_size} px, "
          f"{args.fraction:.0%} of the cells blurred, {args.seeds} seeds: weighted F1 mean +- std")
    print("sigma | clean | blurred | filtered | filtered - blurred (SE, won) | threshold | blurred/sharp train "
          "dropped | gated F1 (test kept)")
    for s in summary:
        d = s["filtered_minus_blurred"]
        print(f"{s['sigma']:g} | {s['clean'][0]:.3f} +- {s['clean'][1]:.3f} | {s['blurred'][0]:.3f} +- "
              f"{s['blurred'][1]:.3f} | {s['filtered'][0]:.3f} +- {s['filtered'][1]:.3f} | {d[0]:+.3f} +- {d[1]:.3f}, "
              f"{d[2]}/{s['seeds']} | {s['threshold'][0]:.3f} | {s['blurred_train_dropped'][0]:.0%} / "
              f"{s['sharp_train_dropped'][0]:.0%} | {s['gated'][0]:.3f} ({s['test_kept'][0]:.0%})")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                         "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
