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

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil.bags import Bags, Positives
from cytoretrieve.queries.mil.methods import DEFAULT_METHOD, get_method, method_config
from cytoretrieve.queries.mil.metrics import METRICS, accuracy, slide_metrics, youden_threshold
from cytoretrieve.queries.stats import mean_std

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


def fold_roles(fold_of_bag: np.ndarray, fold: int, folds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) bag indices of `fold`: test = that fold, validation = the next one, train = the
    rest; `fold_of_bag[i]` is bag i's fold."""
    val = (fold + 1) % folds
    return (np.flatnonzero((fold_of_bag != fold) & (fold_of_bag != val)), np.flatnonzero(fold_of_bag == val),
            np.flatnonzero(fold_of_bag == fold))


def cross_validate(bags: Bags, split, method: str = DEFAULT_METHOD, *, train_config=None, retrieval_config=None,  # noqa: ANN001
                   positives: Positives | None = None, folds: list[int] | None = None) -> CVResult:
    """Cross-validate `method` (a name of `methods.METHODS`) over the folds of `split` (a `slides.split.Split`
    covering every bag: checked here). `train_config` / `retrieval_config`: the option group the method reads.

    `positives` (annotated cells / tiles) serve the methods that use them and positive-bag augmentation; in each
    fold, those of the validation and test slides are left out."""
    from cytoretrieve.queries.mil.bags import check_split

    scoring = get_method(method)
    check_split(bags, split)
    if split.folds < 3:
        raise CytoError(f"the split has {split.folds} folds; scoring needs at least 3 (train, validation, test)")
    fold_arr = np.array([split.fold_of[n] for n in bags.names])
    oof = np.full(len(bags), np.nan)
    tiles: dict[str, list[float]] = {}
    results: list[FoldResult] = []
    notes: list[str] = []
    config = method_config(scoring, train_config, retrieval_config)
    # positive-bag augmentation supplies positive training bags; negative ones must come from the folds
    augmenting = scoring.trains and positives is not None and config.augment_positives > 0
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
        scorer = scoring.fit(train, fold_positives.vectors if fold_positives is not None else None, config)
        preds = [scorer.predict(g) for g in groups]
        (s_test, t_test), (s_val, _) = preds[0], preds[1]
        if on_val:
            thr = youden_threshold(y_val, s_val)
        else:
            thr = youden_threshold(train.y, preds[2][0])
            notes.append(f"fold {f}: validation fold {v} holds one class; threshold chosen on the training folds")
        y_test = bags.y[test_i]
        m = slide_metrics(y_test, s_test, thr)
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
        config=asdict(config) if is_dataclass(config) else {},
        notes=notes,
    )


def repeated_cv(bags: Bags, config=None, *, folds: int = 10, repeats: int = 5, seed: int = 0,  # noqa: ANN001
                method: str = DEFAULT_METHOD) -> np.ndarray:
    """Accuracies of the (folds x repeats) protocol: KFold(shuffle) over bags, repeat r seeded `seed + r`, the
    model standardised (and clipped, `config.clip`) and trained on the training bags of each fold (fold f of repeat r seeded
    `config.seed + 1000 r + f`; a repeat's folds trained in lockstep by `fit_many`), accuracy at probability 0.5
    on its test bags. Fold order: repeat by repeat. `method`: a trained method of `methods.METHODS`."""
    from dataclasses import replace

    from sklearn.model_selection import KFold

    from cytoretrieve.queries.mil.train import fit_many

    trained = get_method(method)
    if not trained.trains:
        raise CytoError(f"the MIL-benchmark protocol trains models; `method` {method} trains none")
    cfg = method_config(trained, config)
    accs = []
    for r in range(repeats):
        splits = list(KFold(n_splits=folds, shuffle=True, random_state=seed + r).split(np.arange(len(bags))))
        scorers = fit_many([bags.subset(tr) for tr, _ in splits],
                           [replace(cfg, seed=cfg.seed + 1000 * r + f) for f in range(len(splits))])
        for scorer, (_, te) in zip(scorers, splits):
            p, _ = scorer.predict(bags.subset(te).vectors)
            accs.append(accuracy(bags.y[te], p, 0.5))
    return np.asarray(accs)
