"""MIL slide scoring at cohort scale: a trained ABMIL and the training-free retrieval score over a synthetic store of
286 slides x 5,200 tiles x 384 dimensions (1.49M tile vectors), with wall time and peak memory per method.

    .venv/bin/python benchmarks/mil_scale.py [--quick] [--json out.json] [--slides 286 --tiles 5200 --dim 384]
                                            [--methods abmil,retrieval] [--epochs 10] [--store DIR]

1. The store (built once, reused while it holds the right rows): one LanceDB vector table written through the
   package's API (`Store.create_or_open`, `VectorTable.make_rows` / `add` in ~20k-row batches, `finish`), with
   `slide`, `group`, `x`, `y` set as `cytoretrieve tile` + `embed` would. Vectors are clustered: 50 "normal" cluster
   centres, each with its own 16-dimensional subspace of variation, plus isotropic noise and a small per-slide
   offset; every slide mixes the normal clusters in its own (Dirichlet) proportions. Half the slides are positive,
   and 1-3% of a positive slide's tiles come from 5 "abnormal" clusters instead. Beside the table: the labels CSV
   (slide,label,binary) and a 4-fold split file made by the package's split code (`cytoretrieve split`).
   Default store: a folder in the system temp dir (outside the repository), kept between runs.
2. Each method runs in a fresh subprocess, so its peak RSS (VmHWM) is its own:
   - abmil: `load_bags` (all 286 slides), `fit` on fold 0's training slides (as `cytoretrieve score`: test fold 0,
     validation fold 1, train the rest), then `MILScorer.predict` over all slides (timed: the "< 10 s" figure);
   - retrieval: `load_bags`, `fit_retrieval` on the same training slides (no annotated cells: the positive
     references are every tile of the positive training slides), then tile + slide scores of all slides (timed).
   Each reports load / train (index build) / inference seconds, peak RSS and the AUC of the slide scores on the
   test fold (a sanity check that the synthetic signal is found); retrieval also reports, on a sample of tiles,
   recall@k of its neighbours and the error of its tile scores against exact (flat) search.
3. `--baseline-slides N` also times the previous retrieval code (cytoretrieve.store.index "auto": IVFFlat, nlist 4 sqrt(n),
   nprobe 16, queries slide by slide, unsorted) on N query slides and extrapolates to all slides.

Run it alone on the machine: it uses every core (torch and FAISS threads), and each method holds the 2.1 GiB of
vectors (1.49M x 384 float32) unless `--stream` leaves them in the table. Figures: BENCHMARKS.md, "MIL scoring at
cohort scale".
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from _common import loadavg, machine, print_machine, write_json  # noqa: E402

GENERATOR_VERSION = 1
N_NORMAL, N_ABNORMAL, RANK = 50, 5, 16
TILE = 320
BATCH_ROWS = 20_000
GiB = 2**30


# ------------------------------------------------------------------------------------------------ the data


def centres(dim: int, seed: int):  # noqa: ANN201
    """Cluster centres (normal first, then abnormal) sharing a common direction, and each cluster's basis of
    variation (n, dim, RANK), orthonormal columns."""
    import numpy as np

    rng = np.random.default_rng([seed, 0])

    def unit(n: int):  # noqa: ANN202
        x = rng.standard_normal((n, dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    common = unit(1)
    c = np.concatenate([0.6 * common + 0.8 * unit(N_NORMAL), 0.6 * common + 0.8 * unit(N_ABNORMAL)]).astype(np.float32)
    bases = np.linalg.qr(rng.standard_normal((len(c), dim, RANK)))[0].astype(np.float32)
    return c, bases


def is_positive(i: int, slides: int, seed: int, share: float = 0.5) -> bool:
    """A `share` of the slides (a seeded permutation's first ones; half by default) are positive."""
    import numpy as np

    order = np.random.default_rng([seed, 1]).permutation(slides)
    return bool(i in set(order[: round(slides * share)].tolist()))


def abnormal_mask(i: int, positive: bool, tiles: int, seed: int, frac: tuple[float, float] = (0.01, 0.03)):  # noqa: ANN201
    """Which tiles of slide i come from abnormal clusters (a `frac` share of a positive slide's tiles, drawn
    uniformly; none otherwise)."""
    import numpy as np

    mask = np.zeros(tiles, dtype=bool)
    if positive:
        rng = np.random.default_rng([seed, 2, i])
        n = max(1, int(round(rng.uniform(*frac) * tiles)))
        mask[rng.choice(tiles, n, replace=False)] = True
    return mask


def slide_vectors(i: int, positive: bool, tiles: int, c, bases, seed: int,  # noqa: ANN001, ANN201
                  frac: tuple[float, float] = (0.01, 0.03)):
    """(tiles, dim) float32 vectors of slide i and its abnormal-tile mask; deterministic per (seed, i)."""
    import numpy as np

    dim = c.shape[1]
    mask = abnormal_mask(i, positive, tiles, seed, frac)
    rng = np.random.default_rng([seed, 3, i])
    cl = rng.choice(N_NORMAL, tiles, p=rng.dirichlet(np.full(N_NORMAL, 0.5)))
    cl[mask] = N_NORMAL + rng.integers(0, N_ABNORMAL, int(mask.sum()))
    z = rng.standard_normal((tiles, RANK), dtype=np.float32) * np.float32(0.7 / math.sqrt(RANK))
    x = c[cl]
    for k in np.unique(cl):
        m = cl == k
        x[m] += z[m] @ bases[k].T
    x += rng.standard_normal(dim).astype(np.float32) * np.float32(0.1 / math.sqrt(dim))
    x += rng.standard_normal((tiles, dim), dtype=np.float32) * np.float32(0.25 / math.sqrt(dim))
    return x, mask


def slide_name(i: int) -> str:
    return f"synth-{i:04d}"


def table_name(args: argparse.Namespace) -> str:
    return f"mil_scale_{args.slides}x{args.tiles}x{args.dim}_s{args.seed}"


def fingerprint(args: argparse.Namespace) -> str:
    spec = f"mil-scale v{GENERATOR_VERSION} {args.slides} {args.tiles} {args.dim} {args.seed}"
    return hashlib.sha256(spec.encode()).hexdigest()


def build_store(args: argparse.Namespace) -> dict[str, Any]:
    """The synthetic vector table (reused when it holds the expected rows), its labels CSV and split file."""
    import numpy as np

    from cytoretrieve.errors import CytoError
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split
    from cytoretrieve.store.tables import Store

    store = Store(args.store)
    name = table_name(args)
    expected = args.slides * args.tiles
    backbone = {"arch": "synthetic-clusters", "fingerprint": fingerprint(args), "dim": args.dim}
    dataset = {"name": "mil-scale", "kind": "synthetic", "generator": GENERATOR_VERSION}
    info: dict[str, Any] = {"table": name, "rows": expected, "store": str(args.store)}
    table = None
    if name in store.table_names() and not args.rebuild:
        try:
            table = store.create_or_open(name, backbone, dataset)
        except CytoError:
            table = None
        if table is not None and table.count() != expected:
            table = None
    if table is not None:
        info["built"] = False
        print(f"store: reusing table {name} ({expected:,} rows) in {args.store}", flush=True)
    else:
        if name in store.table_names():
            store.db.drop_table(name)
        t0 = time.perf_counter()
        table = store.create_or_open(name, backbone, dataset)
        c, bases = centres(args.dim, args.seed)
        cols = math.ceil(math.sqrt(args.tiles))
        per_batch = max(1, BATCH_ROWS // args.tiles)
        t_gen = 0.0
        for a in range(0, args.slides, per_batch):
            tg = time.perf_counter()
            records, vecs = [], []
            for i in range(a, min(a + per_batch, args.slides)):
                s = slide_name(i)
                x, _ = slide_vectors(i, is_positive(i, args.slides, args.seed), args.tiles, c, bases, args.seed)
                vecs.append(x)
                for t in range(args.tiles):
                    px, py = (t % cols) * TILE, (t // cols) * TILE
                    records.append({"id": f"{s}@{px},{py},{TILE}", "dataset": "mil-scale", "group": s, "slide": s,
                                    "x": px, "y": py, "level": 0, "tile_size": TILE, "mpp": 0.5})
            rows = table.make_rows(records, np.concatenate(vecs))
            t_gen += time.perf_counter() - tg
            table.add(rows)
            done = min(a + per_batch, args.slides)
            print(f"\rstore: {done}/{args.slides} slides written", end="", flush=True)
        print(flush=True)
        tf = time.perf_counter()
        table.finish()
        info.update(built=True, build_s=time.perf_counter() - t0, generate_s=t_gen, finish_s=time.perf_counter() - tf)
        print(f"store: built {name} ({expected:,} rows) in {info['build_s']:.0f} s "
              f"(generating {t_gen:.0f} s, finish {info['finish_s']:.0f} s)", flush=True)
        if table.count() != expected:
            raise SystemExit(f"store: table {name} holds {table.count()} rows, expected {expected}")
    base = Path(args.store) / name
    labels_path = base.with_suffix(".labels.csv")
    with labels_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "binary"])
        for i in range(args.slides):
            pos = is_positive(i, args.slides, args.seed)
            w.writerow([slide_name(i), "HSIL" if pos else "NILM", int(pos)])
    split, _ = make_split(read_labels(labels_path), folds=args.folds, seed=args.seed, source=str(labels_path))
    split_path = write_split(split, base.with_suffix(".split.json"))
    info.update(labels=str(labels_path), split=str(split_path),
                positives=sum(is_positive(i, args.slides, args.seed) for i in range(args.slides)))
    return info


# --------------------------------------------------------------------------------------------- measurement


def peak_rss() -> int:
    """Peak resident set of this process so far, bytes: /proc/self/status VmHWM (the high-water mark of this
    address space). getrusage's ru_maxrss is not used: Linux carries it across fork + exec, so a worker would start
    with its parent's RSS as its "peak"."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One method in this (fresh) process: load, fit, infer over every slide; times, memory and AUC."""
    import numpy as np

    from cytoretrieve.queries.mil.bags import load_bags
    from cytoretrieve.queries.mil.evaluate import fold_roles
    from cytoretrieve.queries.mil.metrics import auc
    from cytoretrieve.sources.cohort.split import load_split
    from cytoretrieve.store.tables import Store

    method = args.worker
    out: dict[str, Any] = {"method": method, "rss_after_imports": peak_rss()}
    if method == "abmil":
        import torch

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        out["torch_threads"] = torch.get_num_threads()
    else:
        import faiss

        if method == "hard":
            return hard_cohort(args)
        if args.threads:
            faiss.omp_set_num_threads(args.threads)
        out["faiss_threads"] = faiss.omp_get_max_threads()
    out["rss_after_imports"] = peak_rss()
    base = Path(args.store) / table_name(args)
    table = Store(args.store).open(table_name(args))
    split = load_split(base.with_suffix(".split.json"))

    t0 = time.perf_counter()
    bags = load_bags(table, base.with_suffix(".labels.csv"), stream=args.stream)
    out.update(load_s=time.perf_counter() - t0, rss_after_load=peak_rss(), slides=len(bags),
               tiles=bags.instances, notes=bags.notes)
    train_i, _, test_i = fold_roles(np.array([split.fold_of[n] for n in bags.names]), args.fold, split.folds)
    train = bags.subset(train_i)
    out.update(train_slides=len(train_i), test_slides=len(test_i), train_tiles=train.instances)
    print(f"[{method}] loaded {len(bags)} slides / {bags.instances:,} tiles in {out['load_s']:.1f} s", file=sys.stderr,
          flush=True)

    if method == "abmil":
        from cytoretrieve.queries.mil.train import MILTrainConfig, fit

        cfg = MILTrainConfig(method="abmil", epochs=args.epochs, device="cpu", seed=args.seed)
        t0 = time.perf_counter()
        scorer = fit(train, cfg)
        out.update(train_s=time.perf_counter() - t0, epochs=args.epochs, rss_after_train=peak_rss(),
                   config=cfg.to_dict())
        print(f"[abmil] trained {args.epochs} epochs in {out['train_s']:.1f} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        scores, tile_scores = scorer.predict(bags.vectors)
        out["inference_s"] = time.perf_counter() - t0
        out["peak_rss"] = peak_rss()
        if scorer.clip > 0:  # the clip's cost, side by side: the same model, without and with it, alternately
            clip, times = scorer.clip, {"unclipped": [], "clipped": []}
            for _ in range(2):
                for name, c in (("unclipped", 0.0), ("clipped", clip)):
                    scorer.clip = c
                    t0 = time.perf_counter()
                    s, _ = scorer.predict(bags.vectors)
                    times[name].append(time.perf_counter() - t0)
                    if c == 0:
                        out["auc_unclipped"] = auc(bags.y[test_i], s[test_i])
            scorer.clip = clip
            out["inference_alternating_s"] = times  # after the first pass above: warm
        print(f"[abmil] scored {bags.instances:,} tiles in {out['inference_s']:.1f} s" + (
            " (then alternately: without the clip {}, with it {} s)".format(
                *(", ".join(f"{t:.2f}" for t in out["inference_alternating_s"][k]) for k in ("unclipped", "clipped")))
            if "inference_alternating_s" in out else ""), file=sys.stderr, flush=True)
    else:
        from cytoretrieve.queries.mil.retrieval import fit_retrieval

        cfg = retrieval_config(args, method)
        t0 = time.perf_counter()
        scorer = fit_retrieval(train, config=cfg)
        out.update(train_s=time.perf_counter() - t0, rss_after_train=peak_rss(), config=cfg.to_dict(),
                   index=scorer.describe())
        print(f"[{method}] references indexed in {out['train_s']:.1f} s: {out['index']}", file=sys.stderr, flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        scores, tile_scores = scorer.predict(bags.vectors)
        # CPU seconds of this process (all its threads): under a load from other jobs, wall time overstates the cost
        out["inference_s"], out["inference_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        print(f"[{method}] scored {bags.instances:,} tiles in {out['inference_s']:.1f} s "
              f"({out['inference_cpu_s']:.1f} CPU s)", file=sys.stderr, flush=True)
        out["peak_rss"] = peak_rss()  # the method's peak: the checks below hold more (exact search, old code)
        sample = None
        if args.recall_sample and cfg.references == "tiles":
            x, abnormal = accuracy_sample(bags, args.recall_sample, args.seed)
            out["accuracy_vs_exact"], exact = retrieval_accuracy(scorer, train, x, abnormal)
            sample = (x, abnormal, exact)
        if args.baseline_slides and cfg.references == "tiles":
            del scorer
            out["baseline"] = retrieval_baseline(train, bags, args.baseline_slides, cfg, args.seed, sample)
    y = bags.y
    out["auc_test_fold"] = auc(y[test_i], np.asarray(scores)[test_i])
    out["auc_all_slides"] = auc(y, np.asarray(scores))
    # tile level: abnormal vs normal tiles of the positive test slides (the generator knows which they are)
    c_pos = [i for i in test_i if y[i] == 1]
    masks = [abnormal_mask(int(bags.names[i].split("-")[1]), True, args.tiles, args.seed) for i in c_pos]
    ts = [np.asarray(tile_scores[i]) for i in c_pos]
    if ts and all(len(t) == len(m) for t, m in zip(ts, masks)):
        out["tile_auc_positive_test_slides"] = auc(np.concatenate(masks), np.concatenate(ts))
    out["peak_rss_with_checks"] = peak_rss()
    if args.scores_dir and method != "abmil":
        np.savez(Path(args.scores_dir) / f"{method}.npz", tiles=np.concatenate([np.asarray(t) for t in tile_scores]),
                 sizes=[len(t) for t in tile_scores], names=np.array(bags.names), test=test_i, y=y)
    print(f"[{method}] inference over {len(bags)} slides: {out['inference_s']:.2f} s; AUC (test fold) "
          f"{out['auc_test_fold']:.3f}; peak RSS {out['peak_rss'] / GiB:.2f} GiB", file=sys.stderr, flush=True)
    return out


def retrieval_config(args: argparse.Namespace, method: str):  # noqa: ANN201
    """`retrieval`: tile references, with --retrieval-index / --nprobe / --refine; `retrieval-centroids`: references =
    centroids (`score --method retrieval`'s default), with --centroids / --rank."""
    from cytoretrieve.queries.mil.retrieval import RetrievalConfig

    if method == "retrieval":
        return RetrievalConfig(references="tiles", index=args.retrieval_index, nprobe=args.nprobe, refine=args.refine)
    if method != "retrieval-centroids":
        raise SystemExit(f"unknown method {method} (abmil, retrieval, retrieval-centroids, hard)")
    return RetrievalConfig(references="centroids", centroids=args.centroids, rank=args.rank)


def ranks(x):  # noqa: ANN001, ANN201
    import numpy as np

    r = np.empty(len(x), np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def agreement(a, b, abnormal=None) -> dict[str, float]:  # noqa: ANN001
    """Pearson and Spearman correlation of two methods' tile scores (all tiles; and the abnormal / normal tiles
    when their mask is given)."""
    import numpy as np

    def both(x, y) -> tuple[float, float]:  # noqa: ANN001
        return float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(ranks(x), ranks(y))[0, 1])

    out = dict(zip(("pearson", "spearman"), both(a, b)))
    if abnormal is not None and abnormal.any() and (~abnormal).any():
        out.update(zip(("pearson_abnormal", "spearman_abnormal"), both(a[abnormal], b[abnormal])))
        out.update(zip(("pearson_normal", "spearman_normal"), both(a[~abnormal], b[~abnormal])))
    return out


def cohort_agreement(scores_dir: str, tiles: int, seed: int) -> dict[str, Any]:
    """Tile-score agreement of `retrieval-centroids` with `retrieval` over every tile of the cohort run (their saved
    scores), and over the positive test slides' tiles with the abnormal ones apart."""
    import numpy as np

    new, old = (np.load(Path(scores_dir) / f"{m}.npz") for m in ("retrieval-centroids", "retrieval"))
    if not np.array_equal(new["sizes"], old["sizes"]):
        return {}
    bounds = np.r_[0, np.cumsum(new["sizes"])]
    pos_test = [int(i) for i in new["test"] if new["y"][i] == 1]
    rows = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in pos_test])
    mask = np.concatenate([abnormal_mask(int(str(new["names"][i]).split("-")[1]), True, tiles, seed) for i in pos_test])
    return {"all_tiles": agreement(new["tiles"], old["tiles"]),
            "positive_test_slides": agreement(new["tiles"][rows], old["tiles"][rows], mask)}


def hard_cohort(args: argparse.Namespace) -> dict[str, Any]:
    """A harder in-memory cohort (the cohort's AUC is 1.000 for every method): a positive slide holds only
    --hard-frac of abnormal tiles, and (--hard-shift > 0) each abnormal cluster centre is a normal one moved by
    --hard-shift along a random unit direction. Each retrieval method is cross-validated over 4 folds (test f, validation f + 1 unused, train
    the rest): slide AUC per fold, out-of-fold AUC, tile AUC of the abnormal tiles of the positive test slides,
    agreement of the centroid tile scores with the tile references' ones."""
    import numpy as np

    from cytoretrieve.queries.mil.bags import Bags
    from cytoretrieve.queries.mil.evaluate import fold_roles
    from cytoretrieve.queries.mil.metrics import auc
    from cytoretrieve.queries.mil.retrieval import fit_retrieval

    n, tiles, frac = args.hard_slides, args.hard_tiles, (args.hard_frac[0], args.hard_frac[1])
    c, bases = centres(args.dim, args.seed + 1)
    rng = np.random.default_rng([args.seed, 9])
    for a in range(N_NORMAL, N_NORMAL + N_ABNORMAL if args.hard_shift > 0 else 0):
        u = rng.standard_normal(args.dim).astype(np.float32)
        c[a] = c[a - N_NORMAL] + args.hard_shift * u / np.linalg.norm(u)
    y = np.array([is_positive(i, n, args.seed, args.hard_positives) for i in range(n)], dtype=np.int8)
    made = [slide_vectors(i, bool(y[i]), tiles, c, bases, args.seed, frac) for i in range(n)]
    bags = Bags(names=[slide_name(i) for i in range(n)], y=y, vectors=[v for v, _ in made])
    fold_of = np.random.default_rng([args.seed, 10]).permutation(n) % 4
    out: dict[str, Any] = {"method": "hard", "slides": n, "tiles": tiles, "shift": args.hard_shift, "frac": frac,
                           "positive_slides": int(y.sum()),
                           "abnormal_tiles_per_positive_slide": float(np.mean([m.sum() for _, m in made if m.any()]))}
    tile_all: dict[str, np.ndarray] = {}
    for method in ("retrieval", "retrieval-centroids"):
        cfg = retrieval_config(args, method)
        oof, per_fold, tile_auc, tile_s = np.zeros(n), [], [], [np.zeros(0)] * n
        for f in range(4):
            train_i, _, test_i = fold_roles(fold_of, f, 4)
            t0 = time.perf_counter()
            s, ts = fit_retrieval(bags.subset(train_i), config=cfg).predict([bags.vectors[i] for i in test_i])
            oof[test_i] = s
            per_fold.append(auc(y[test_i], s))
            pos = [j for j, i in enumerate(test_i) if y[i]]
            tile_auc.append(auc(np.concatenate([made[test_i[j]][1] for j in pos]), np.concatenate([ts[j] for j in pos])))
            for j, i in enumerate(test_i):
                tile_s[i] = ts[j]
            print(f"[hard] {method} fold {f}: AUC {per_fold[-1]:.3f}, tile AUC {tile_auc[-1]:.3f} "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        tile_all[method] = np.concatenate(tile_s)
        out[method] = {"auc_per_fold": per_fold, "auc_mean": float(np.mean(per_fold)), "auc_std": float(np.std(per_fold)),
                       "auc_out_of_fold": auc(y, oof), "tile_auc_per_fold": tile_auc,
                       "tile_auc_mean": float(np.mean(tile_auc)), "config": cfg.to_dict()}
    mask = np.concatenate([m for _, m in made])
    keep = np.repeat(y == 1, tiles)
    out["agreement"] = {"all_tiles": agreement(tile_all["retrieval-centroids"], tile_all["retrieval"]),
                        "positive_slides": agreement(tile_all["retrieval-centroids"][keep], tile_all["retrieval"][keep],
                                                     mask[keep])}
    out["peak_rss"] = peak_rss()
    return out


def exact_neighbours(chunks, q, k: int):  # noqa: ANN001, ANN201
    """Exact top-k inner products of the normalised `q` over the rows of `chunks` (ids: rows in chunk order), one
    chunk in memory at a time (IndexFlatIP per chunk, merged with FAISS's ResultHeap)."""
    import faiss
    import numpy as np

    from cytoretrieve.store.ann import l2_normalise

    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    offset = 0
    for i in range(len(chunks)):
        c = l2_normalise(np.asarray(chunks[i]))
        flat = faiss.IndexFlatIP(c.shape[1])
        flat.add(c)
        d, ids = flat.search(q, min(k, len(c)))
        if d.shape[1] < k:
            d = np.pad(d, ((0, 0), (0, k - d.shape[1])), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
        heap.add_result(np.ascontiguousarray(d), np.where(ids >= 0, ids + offset, -1))
        offset += len(c)
    heap.finalize()
    return heap.D, heap.I


def accuracy_sample(bags, n: int, seed: int):  # noqa: ANN001, ANN201
    """`n` tiles drawn from every slide, plus every abnormal tile of 5 positive slides: (vectors, abnormal mask)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = np.array([len(bags.vectors[i]) for i in range(len(bags))])
    pick = np.sort(rng.choice(int(sizes.sum()), min(n, int(sizes.sum())), replace=False))
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    bag_of = np.searchsorted(np.cumsum(sizes), pick, side="right")
    rows, abnormal = [], []
    for b in np.unique(bag_of):
        m = abnormal_mask(int(bags.names[b].split("-")[1]), bool(bags.y[b]), int(sizes[b]), seed)
        at = pick[bag_of == b] - starts[b]
        rows.append(np.asarray(bags.vectors[b])[at])
        abnormal.append(m[at])
    for b in [i for i in range(len(bags)) if bags.y[i] == 1][:5]:
        m = abnormal_mask(int(bags.names[b].split("-")[1]), True, int(sizes[b]), seed)
        rows.append(np.asarray(bags.vectors[b])[m])
        abnormal.append(m[m])
    return np.concatenate(rows).astype(np.float32), np.concatenate(abnormal)


def compare(approx, exact, abnormal, k: int) -> dict[str, Any]:  # noqa: ANN001
    """Recall@k (positives, negatives; all tiles and abnormal ones) and the tile-score error of `approx` against
    `exact`, each ((D_pos, I_pos), (D_neg, I_neg))."""
    import numpy as np

    (dp, ip), (dn, i_n) = approx
    (ep, eip), (en, ein) = exact

    def recall(a, e, rows=None) -> float:  # noqa: ANN001
        rows = np.arange(len(a)) if rows is None else np.flatnonzero(rows)
        return float(np.mean([len(set(a[i]) & set(e[i])) / k for i in rows])) if len(rows) else float("nan")

    err = np.abs((dp.mean(1) - dn.mean(1)) - (ep.mean(1) - en.mean(1)))
    return {"recall_at_k_positives": recall(ip, eip), "recall_at_k_negatives": recall(i_n, ein),
            "recall_at_k_negatives_normal_tiles": recall(i_n, ein, ~abnormal),
            "recall_at_k_negatives_abnormal_tiles": recall(i_n, ein, abnormal),
            "tile_score_abs_error_mean": float(err.mean()), "tile_score_abs_error_p99": float(np.percentile(err, 99)),
            "tile_score_abs_error_max": float(err.max())}


def retrieval_accuracy(scorer, train, x, abnormal) -> tuple[dict[str, Any], Any]:  # noqa: ANN001
    """The scorer's neighbours of the sample `x` against exact inner-product search over the same references;
    returns the comparison and the exact results (for the baseline)."""
    import numpy as np

    from cytoretrieve.store.ann import l2_normalise

    q = l2_normalise(x)
    k = scorer.config.k
    y = np.asarray(train.y)
    t0 = time.perf_counter()
    exact = (exact_neighbours(train.subset(np.flatnonzero(y == 1)).vectors, q, k),
             exact_neighbours(train.subset(np.flatnonzero(y == 0)).vectors, q, k))
    exact_s = time.perf_counter() - t0
    result = compare(scorer.neighbours(x), exact, abnormal, k)
    (ep, _), (en, _) = exact
    result.update(sample=len(x), abnormal_tiles_in_sample=int(abnormal.sum()), exact_s=exact_s,
                  tile_score_spread_std=float((ep.mean(1) - en.mean(1)).std()))
    return result, exact


def retrieval_baseline(train, bags, n_slides: int, cfg, seed: int, sample=None) -> dict[str, Any]:  # noqa: ANN001
    """The retrieval code before this benchmark (commit 821ea7e's retrieval.py): both reference sets concatenated
    and indexed by `cytoretrieve.store.index.build(..., "auto")` (IVFFlat above 100k rows: nlist = 4 sqrt(n), nprobe 16,
    k-means with FAISS defaults), queries searched slide by slide. Times the build and the search of `n_slides`
    query slides, extrapolates the search to every slide, and (with `sample` = (x, abnormal, exact)) compares its
    neighbours with exact search as `compare` does."""
    import gc

    import numpy as np

    from cytoretrieve.store.ann import l2_normalise
    from cytoretrieve.store.index import build

    t0 = time.perf_counter()
    neg = np.concatenate([train.vectors[i] for i in range(len(train)) if train.y[i] == 0]).astype(np.float32)
    neg_index, kind = build(neg, np.arange(len(neg)), "auto")
    n_neg = len(neg)
    del neg
    gc.collect()
    pos = np.concatenate([train.vectors[i] for i in range(len(train)) if train.y[i] == 1]).astype(np.float32)
    pos_index, _ = build(pos, np.arange(len(pos)), "auto")
    n_pos = len(pos)
    del pos
    gc.collect()
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(bags), min(n_slides, len(bags)), replace=False)
    t0 = time.perf_counter()
    tiles = 0
    for i in chosen:
        v = bags.vectors[int(i)]
        for a in range(0, len(v), cfg.query_batch):
            q = l2_normalise(v[a:a + cfg.query_batch])
            pos_index.search(q, min(cfg.k, n_pos))
            neg_index.search(q, min(cfg.k, n_neg))
        tiles += len(v)
    search_s = time.perf_counter() - t0
    per_tile = search_s / max(tiles, 1)
    out = {"kind": kind, "nlist_pos": int(getattr(pos_index, "nlist", 0)),
           "nlist_neg": int(getattr(neg_index, "nlist", 0)),
           "nprobe": int(getattr(pos_index, "nprobe", 0)), "build_s": build_s, "query_slides": len(chosen),
           "query_tiles": tiles, "search_s": search_s, "tiles_per_s": tiles / search_s if search_s else None,
           "extrapolated_inference_s": per_tile * bags.instances}
    if sample is not None:
        x, abnormal, exact = sample
        q = l2_normalise(x)
        approx = (pos_index.search(q, min(cfg.k, n_pos)), neg_index.search(q, min(cfg.k, n_neg)))
        out["accuracy_vs_exact"] = compare(approx, exact, abnormal, cfg.k)
    return out


def run_worker(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Run one method in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, *args.passthrough]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{method}: worker failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run: 24 slides x 1,000 tiles, 3 epochs")
    ap.add_argument("--slides", type=int, default=286)
    ap.add_argument("--tiles", type=int, default=5200, help="tiles per slide")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=4, help="folds of the split file (test = --fold, validation = next)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--methods", default="abmil,retrieval,retrieval-centroids",
                    help="abmil, retrieval (references = tiles), retrieval-centroids (references = centroids, the default of score)")
    ap.add_argument("--epochs", type=int, default=10, help="ABMIL training epochs")
    ap.add_argument("--threads", type=int, default=0, help="torch / FAISS threads (0: every core)")
    ap.add_argument("--stream", action="store_true",
                    help="load_bags(stream=True): bags read slide by slide from the table")
    ap.add_argument("--retrieval-index", default="auto", help="RetrievalConfig.index: auto, flat, ivf, ivfpq")
    ap.add_argument("--nprobe", type=int, default=12)
    ap.add_argument("--refine", type=int, default=12, help="ivfpq: candidates re-ranked per neighbour")
    ap.add_argument("--centroids", type=int, default=256, help="retrieval-centroids: cells of the k-means of both reference sets")
    ap.add_argument("--rank", type=int, default=64, help="retrieval-centroids: rank of the means' basis (salient directions come on top; 0: full dimension)")
    ap.add_argument("--hard", action="store_true", help="also cross-validate both retrieval methods on a harder cohort")
    ap.add_argument("--hard-slides", type=int, default=120)
    ap.add_argument("--hard-tiles", type=int, default=2000)
    ap.add_argument("--hard-shift", type=float, default=0.5, help="distance of each abnormal centre from a normal one (0: the cohort's own abnormal centres)")
    ap.add_argument("--hard-frac", type=float, nargs=2, default=[0.002, 0.006], help="abnormal share of a positive slide")
    ap.add_argument("--hard-positives", type=float, default=0.5, help="share of positive slides in the hard cohort")
    ap.add_argument("--scores-dir", help=argparse.SUPPRESS)
    ap.add_argument("--recall-sample", type=int, default=2000, help="tiles checked against exact search (0: skip)")
    ap.add_argument("--baseline-slides", type=int, default=0,
                    help="also time the previous retrieval code on this many query slides, extrapolated (0: skip)")
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "cytoretrieve-mil-scale"),
                    help="LanceDB folder for the synthetic table (default: in the temp dir, kept between runs)")
    ap.add_argument("--rebuild", action="store_true", help="rewrite the table even when it is there")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.slides, args.tiles, args.epochs = min(args.slides, 24), min(args.tiles, 1000), min(args.epochs, 3)
        args.recall_sample = min(args.recall_sample, 500)
        args.baseline_slides = min(args.baseline_slides, 2)
    args.store = str(Path(args.store).absolute())
    args.passthrough = [
        "--slides", str(args.slides), "--tiles", str(args.tiles), "--dim", str(args.dim), "--seed", str(args.seed),
        "--folds", str(args.folds), "--fold", str(args.fold), "--epochs", str(args.epochs),
        "--threads", str(args.threads), "--retrieval-index", args.retrieval_index, "--nprobe", str(args.nprobe),
        "--refine", str(args.refine), "--recall-sample", str(args.recall_sample),
        "--baseline-slides", str(args.baseline_slides), "--store", args.store, *(["--stream"] if args.stream else []),
        "--centroids", str(args.centroids), "--rank", str(args.rank), "--hard-slides", str(args.hard_slides),
        "--hard-tiles", str(args.hard_tiles), "--hard-shift", str(args.hard_shift),
        "--hard-frac", *(str(f) for f in args.hard_frac), "--hard-positives", str(args.hard_positives),
    ]
    return args


def fmt_gib(b: float | None) -> str:
    return f"{b / GiB:.2f} GiB" if b else "-"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        args.stream = True if args.stream else None
        print(json.dumps(worker(args), default=float))
        return
    info = machine()
    print_machine(info)
    store = build_store(args)
    results: dict[str, Any] = {}
    scores_dir = tempfile.TemporaryDirectory(prefix="mil-scale-")
    args.passthrough += ["--scores-dir", scores_dir.name]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        print(f"--- {method} (fresh process), load average {loadavg()}", flush=True)
        results[method] = run_worker(args, method)
    if {"retrieval", "retrieval-centroids"} <= set(results):
        results["agreement"] = cohort_agreement(scores_dir.name, args.tiles, args.seed)
    if args.hard:
        print(f"--- hard cohort (fresh process), load average {loadavg()}", flush=True)
        results["hard"] = run_worker(args, "hard")
    info["loadavg_end"] = loadavg()
    runs = {m: r for m, r in results.items() if "load_s" in r}
    print(f"\n{args.slides} slides x {args.tiles} tiles x {args.dim}-d ({args.slides * args.tiles:,} vectors); "
          f"fold {args.fold}: train {next(iter(runs.values()))['train_slides'] if runs else '?'} slides")
    print("| method | load s | train s | inference s (all slides) | peak RSS | AUC (test fold) |")
    print("|---|---|---|---|---|---|")
    for m, r in runs.items():
        print(f"| {m} | {r['load_s']:.1f} | {r['train_s']:.1f} | {r['inference_s']:.2f} | {fmt_gib(r['peak_rss'])} | "
              f"{r['auc_test_fold']:.3f} |")
    for m, r in runs.items():
        print(f"{m}: index {r.get('index', '-')}; tile AUC (abnormal tiles, positive test slides) "
              f"{r.get('tile_auc_positive_test_slides', float('nan')):.4f}")
        met = r["inference_s"] < 10 and r["peak_rss"] < 4 * GiB
        print(f"{m}: inference < 10 s {'yes' if r['inference_s'] < 10 else 'NO'}, "
              f"peak RSS < 4 GiB {'yes' if r['peak_rss'] < 4 * GiB else 'NO'}{'' if met else ' (target missed)'}")
        if "accuracy_vs_exact" in r:
            print(f"{m}: vs exact search on {r['accuracy_vs_exact']['sample']} tiles: {r['accuracy_vs_exact']}")
        if "baseline" in r:
            b = r["baseline"]
            print(f"{m}: previous code: build {b['build_s']:.0f} s, {b['tiles_per_s']:.0f} tiles/s, "
                  f"all slides ~{b['extrapolated_inference_s']:.0f} s (extrapolated from {b['query_slides']} slides)")
            if "accuracy_vs_exact" in b:
                print(f"{m}: previous code vs exact search: {b['accuracy_vs_exact']}")
    if "agreement" in results:
        print(f"tile scores, retrieval-centroids vs retrieval: {results['agreement']}")
    if "hard" in results:
        h = results["hard"]
        print(f"hard cohort: {h['slides']} slides ({h['positive_slides']} positive) x {h['tiles']} tiles, abnormal shift {h['shift']}, "
              f"{h['abnormal_tiles_per_positive_slide']:.1f} abnormal tiles per positive slide")
        for m in ("retrieval", "retrieval-centroids"):
            r = h[m]
            print(f"  {m}: slide AUC per fold {[round(a, 3) for a in r['auc_per_fold']]} (mean {r['auc_mean']:.3f} "
                  f"+- {r['auc_std']:.3f}, out-of-fold {r['auc_out_of_fold']:.3f}); tile AUC {r['tile_auc_mean']:.4f}")
        print(f"  tile scores, retrieval-centroids vs retrieval: {h['agreement']}")
    print(f"load average at end: {info['loadavg_end']}")
    write_json(args.json, {"machine": info, "store": store, "args": {k: v for k, v in vars(args).items()
                                                                    if k != "passthrough"}, "results": results})


if __name__ == "__main__":
    main()
