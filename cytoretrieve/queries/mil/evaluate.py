"""Cross-validation of slide scores over the split file's folds, and the MIL-benchmark protocol.

`cross_validate`: for each fold f of the split, test = fold f, validation = fold (f + 1) mod F, train = the
rest. The model (or the retrieval references) is fitted on train; the threshold is the one maximising Youden's J
(sensitivity + specificity - 1) on the validation scores (when validation holds one class only, on the training
scores instead, and the fold says so). On test: AUC (threshold-free), and at the threshold sensitivity,
specificity, balanced accuracy, F1 and accuracy; each per fold and mean +- std over folds (population std,
numpy's default, as `knn.py`). Every slide is tested exactly once, so the out-of-fold scores give one ROC curve.

`repeated_cv`: the protocol of the MIL-benchmark literature (MI-Net, ABMIL): K-fold CV over bags (shuffled)
repeated R times, 10 x 5 = 50 folds, accuracy at probability 0.5, no validation set; mean +- std over the 50.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil.bags import Bags, Positives
from cytoretrieve.queries.stats import mean_std

METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "accuracy")
ALL_METHODS = ("abmil", "gated", "mean", "max", "topk", "retrieval")


# ---------------------------------------------------------------------------------------------------- metrics


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney); nan for one class."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of 1-based ranks a+1..b
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind="mergesort")
    s_sorted = np.asarray(s, dtype=np.float64)[order]
    tp = np.cumsum(y[order])
    fp = np.cumsum(~y[order])
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tpr = np.r_[0, tp[last]] / max(int(y.sum()), 1)
    fpr = np.r_[0, fp[last]] / max(int((~y).sum()), 1)
    return fpr, tpr


def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """The threshold t (predict positive when score >= t) maximising sensitivity + specificity - 1; ties go to
    the midpoint between the chosen score and the next lower one (a margin on both sides)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    cands = np.unique(s)
    best, best_t = -np.inf, float(cands[0])
    for i, t in enumerate(cands):
        pred = s >= t
        j = pred[y].mean() + (~pred[~y]).mean() - 1 if y.any() and (~y).any() else 0.0
        if j > best + 1e-12:
            best = j
            best_t = float((t + cands[i - 1]) / 2) if i > 0 else float(t)
    return best_t


def binary_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, balanced accuracy, F1 (positive class) and accuracy of `s >= threshold`."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(s, dtype=np.float64) >= threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": float(np.nanmean([sens, spec])),
            "f1": f1, "accuracy": (tp + tn) / len(y) if len(y) else float("nan")}


# -------------------------------------------------------------------------------------------- cross-validation


@dataclass
class FoldResult:
    fold: int
    n_train: int
    n_val: int
    n_test: int
    threshold: float
    threshold_on: str  # "validation" or "train"
    metrics: dict[str, float]


@dataclass
class CVResult:
    method: str
    folds: list[FoldResult]
    mean: dict[str, float]
    std: dict[str, float]
    slides: list[str]  # every slide, in the order of the out-of-fold arrays
    y: list[int]
    scores: list[float]  # out-of-fold slide scores
    fold_of: list[int]
    tile_scores: dict[str, list[float]] = field(default_factory=dict)  # out-of-fold, per slide
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, tiles: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not tiles:
            d.pop("tile_scores")
        return d


def _fit_predict(method: str, train: Bags, tests: list[Sequence[np.ndarray]], train_config, retrieval_config,  # noqa: ANN001
                 positives: Positives | None) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    if method == "retrieval":
        from cytoretrieve.queries.mil.retrieval import fit_retrieval

        scorer = fit_retrieval(train, positives.vectors if positives is not None else None, retrieval_config)
    else:
        from dataclasses import replace

        from cytoretrieve.queries.mil.train import MILTrainConfig, fit

        cfg = replace(train_config or MILTrainConfig(), method=method)
        scorer = fit(train, cfg, positives.vectors if positives is not None and cfg.augment_positives > 0 else None)
    return [scorer.predict(t) for t in tests]


def fold_roles(fold_of_bag: np.ndarray, fold: int, folds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) bag indices of `fold`: test = that fold, validation = the next one, train = the
    rest; `fold_of_bag[i]` is bag i's fold."""
    val = (fold + 1) % folds
    return (np.flatnonzero((fold_of_bag != fold) & (fold_of_bag != val)), np.flatnonzero(fold_of_bag == val),
            np.flatnonzero(fold_of_bag == fold))


def cross_validate(bags: Bags, split, method: str = "abmil", *, train_config=None, retrieval_config=None,  # noqa: ANN001
                   positives: Positives | None = None, folds: list[int] | None = None) -> CVResult:
    """Cross-validate `method` over the folds of `split` (a `slides.split.Split` covering every bag).

    `positives` (annotated cells / tiles) serve the retrieval method and positive-bag augmentation; in each fold,
    those of the validation and test slides are left out."""
    from cytoretrieve.queries.mil.bags import check_split

    if method not in ALL_METHODS:
        raise CytoError(f"unknown method '{method}' (one of {', '.join(ALL_METHODS)})")
    check_split(bags, split)
    if split.folds < 3:
        raise CytoError(f"the split has {split.folds} folds; scoring needs at least 3 (train, validation, test)")
    fold_arr = np.array([split.fold_of[n] for n in bags.names])
    oof = np.full(len(bags), np.nan)
    tiles: dict[str, list[float]] = {}
    results: list[FoldResult] = []
    notes: list[str] = []
    # positive-bag augmentation supplies positive training bags; negative ones must come from the folds
    augmenting = method != "retrieval" and positives is not None and train_config is not None \
        and train_config.augment_positives > 0
    for f in folds if folds is not None else range(split.folds):
        v = (f + 1) % split.folds
        train_i, val_i, test_i = fold_roles(fold_arr, f, split.folds)
        train = bags.subset(train_i)
        classes = set(train.y.tolist())
        if 0 not in classes or (1 not in classes and not augmenting):
            raise CytoError(f"fold {f}: the training folds hold only one class; use fewer folds")
        fold_positives = None
        if positives is not None:
            held_out = {bags.names[i] for i in np.r_[test_i, val_i]}
            fold_positives = positives.excluding(held_out)
            if not len(fold_positives):
                raise CytoError(f"fold {f}: every annotated positive comes from its validation or test slides")
            if len(fold_positives) < len(positives):
                notes.append(f"fold {f}: {len(positives) - len(fold_positives)} annotated positive(s) of its "
                             "validation / test slides left out")
        y_val = bags.y[val_i]
        on_val = len(set(y_val.tolist())) == 2
        groups = [bags.subset(test_i).vectors, bags.subset(val_i).vectors]
        if not on_val:
            groups.append(train.vectors)
        preds = _fit_predict(method, train, groups, train_config, retrieval_config, fold_positives)
        (s_test, t_test), (s_val, _) = preds[0], preds[1]
        if on_val:
            thr = youden_threshold(y_val, s_val)
        else:
            thr = youden_threshold(train.y, preds[2][0])
            notes.append(f"fold {f}: validation fold {v} holds one class; threshold chosen on the training folds")
        y_test = bags.y[test_i]
        m = {"auc": auc(y_test, s_test), **binary_metrics(y_test, s_test, thr)}
        results.append(FoldResult(f, len(train_i), len(val_i), len(test_i), thr,
                                  "validation" if on_val else "train", m))
        oof[test_i] = s_test
        for i, t in zip(test_i, t_test):
            tiles[bags.names[i]] = np.asarray(t, dtype=np.float64).tolist()
    stats = {k: mean_std([r.metrics[k] for r in results]) for k in METRICS}
    done = ~np.isnan(oof)
    return CVResult(
        method=method, folds=results, mean={k: s[0] for k, s in stats.items()}, std={k: s[1] for k, s in stats.items()},
        slides=[n for n, d in zip(bags.names, done) if d], y=bags.y[done].astype(int).tolist(),
        scores=oof[done].tolist(), fold_of=fold_arr[done].astype(int).tolist(), tile_scores=tiles,
        config=(retrieval_config.to_dict() if method == "retrieval" and retrieval_config
                else train_config.to_dict() if train_config else {}),
        notes=notes,
    )


def repeated_cv(bags: Bags, config=None, *, folds: int = 10, repeats: int = 5, seed: int = 0,  # noqa: ANN001
                method: str = "abmil") -> np.ndarray:
    """Accuracies of the (folds x repeats) protocol: KFold(shuffle) over bags, repeat r seeded `seed + r`, the
    model standardised (and clipped, `config.clip`) and trained on the training bags of each fold (fold f of repeat r seeded
    `config.seed + 1000 r + f`; a repeat's folds trained in lockstep by `fit_many`), accuracy at probability 0.5
    on its test bags. Fold order: repeat by repeat."""
    from dataclasses import replace

    from sklearn.model_selection import KFold

    from cytoretrieve.queries.mil.train import MILTrainConfig, fit_many

    cfg = replace(config or MILTrainConfig(), method=method)
    accs = []
    for r in range(repeats):
        splits = list(KFold(n_splits=folds, shuffle=True, random_state=seed + r).split(np.arange(len(bags))))
        scorers = fit_many([bags.subset(tr) for tr, _ in splits],
                           [replace(cfg, seed=cfg.seed + 1000 * r + f) for f in range(len(splits))])
        for scorer, (_, te) in zip(scorers, splits):
            p, _ = scorer.predict(bags.subset(te).vectors)
            accs.append(float(((p >= 0.5) == (bags.y[te] == 1)).mean()))
    return np.asarray(accs)


# ------------------------------------------------------------------------------------------ store + outputs


def score_table(store, tiles: str, labels, split, method: str = "abmil", *, group_column: str = "slide",  # noqa: ANN001
                train_config=None, retrieval_config=None, positives_table: str | None = None,  # noqa: ANN001
                stream: bool | None = None) -> tuple[CVResult, Bags]:
    """`cytoretrieve score` as a function: bags of table `tiles` (grouped by `group_column`, labelled by the labels
    CSV `labels`), cross-validated over `split` (a split file path or a `Split`). `positives_table`: annotated
    cells / tiles (rows with binary = 1, same backbone) for the retrieval method's positives and for positive-bag
    augmentation. `stream`: see `load_bags` (None: hold the bags in memory when they fit)."""
    from pathlib import Path

    from cytoretrieve.queries.mil.bags import check_split, load_bags, load_positives
    from cytoretrieve.sources.cohort.split import load_split
    from cytoretrieve.store.tables import Store

    st = store if not isinstance(store, (str, Path)) else Store(store)
    if isinstance(split, (str, Path)):
        split = load_split(split)
    table = st.open(tiles)
    augment = train_config is not None and train_config.augment_positives > 0
    if augment and method == "retrieval":
        raise CytoError("`augment_positives` trains a model; `method` retrieval trains none (drop one of them)")
    if augment and not positives_table:
        raise CytoError("`augment_positives` needs `positives` TABLE (annotated positive cells or tiles)")
    if positives_table and method != "retrieval" and not augment:
        raise CytoError("`positives` is used by `method` retrieval and by `augment_positives`")
    positives = None
    if positives_table:
        pt = st.open(positives_table)
        if pt.fingerprint != table.fingerprint:
            raise CytoError(f"tables '{tiles}' and '{positives_table}' hold vectors of different backbones "
                            f"({table.meta['backbone'].get('arch')} {table.fingerprint[:12]} vs "
                            f"{pt.meta['backbone'].get('arch')} {pt.fingerprint[:12]})")
        positives = load_positives(pt)
    bags = load_bags(table, labels, group_column=group_column, stream=stream)
    check_split(bags, split)
    result = cross_validate(bags, split, method, train_config=train_config, retrieval_config=retrieval_config,
                            positives=positives)
    result.notes = bags.notes + result.notes
    return result, bags


def top_tiles(result: CVResult, bags: Bags, n: int = 10) -> dict[str, Any]:
    """Each slide's `n` highest-scoring tiles (out-of-fold): ids `search `id`` can open, with their scores."""
    out: dict[str, Any] = {}
    pos = {name: i for i, name in enumerate(bags.names)}
    for slide, y, s, f in zip(result.slides, result.y, result.scores, result.fold_of):
        t = np.asarray(result.tile_scores.get(slide, []), dtype=np.float64)
        ids = bags.ids[pos[slide]] if bags.ids is not None else [str(i) for i in range(len(t))]
        order = np.argsort(-t, kind="stable")[:n]
        out[slide] = {"binary": y, "fold": f, "score": s, "tiles": len(t),
                      "top_tiles": [{"id": ids[i], "score": float(t[i])} for i in order]}
    return out
