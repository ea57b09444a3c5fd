"""Cross-dataset transfer from stored vectors: k-NN fitted on the binary labels of support tables, scored on a target.

The paper's Table 3: support = Herlev (H), SIPaKMeD (S) or both (H+S), reduced to positive (1) / negative (0) and
merged (rows whose `binary` is null are left out); k is chosen by weighted F1 on the support itself (seeded
stratified k-fold cross-validation, every k of the range from one neighbour search per fold) unless given; each
target row takes the same k-NN vote over the whole support. On the target: sensitivity alone when it holds only
positives, else sensitivity, specificity, F1 (of positives), balanced accuracy and the confusion matrix.

All vote logic is `cytoretrieve.queries.knn`'s (`vote_all_k`, `knn_predict`); class code 0 = negative,
1 = positive, so a weighted vote's exact tie goes to negative, as class order decides in `vote_all_k`.
No image is opened and no model is loaded; every table must hold vectors of one backbone (one fingerprint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.knn import (
    _check_vote,
    confusions_per_k,
    knn_predict,
    vote_all_k,
    weighted_f1,
)
from cytoretrieve.store.ann import exact_neighbours, l2_normalise

if TYPE_CHECKING:  # keep `import cytoretrieve.queries.transfer` light: the store's tables pull in lancedb
    from cytoretrieve.store.tables import VectorTable

DEFAULT_KS = range(1, 51)
DEFAULT_FOLDS = 5


@dataclass
class TransferResult:
    """What `transfer` measured; plain Python types, so `to_dict` is JSON-able as is.

    `confusion` is [[TN, FP], [FN, TP]] (rows = truth negative/positive, columns = prediction); it and
    specificity, F1 and balanced accuracy are None when the target holds positives only.
    """

    support: list[str]
    target: str
    arch: str
    fingerprint: str
    vote: str
    temperature: float
    k: int
    k_selected: bool  # True: chosen by cross-validation on the support; False: given
    ks: list[int]  # the k values cross-validated ([] when k was given)
    cv_f1_curve: list[float]  # mean weighted F1 over folds for each of ks
    folds: int
    seed: int
    n_support: int
    n_support_positive: int
    n_support_unlabelled: int
    n_target: int
    n_target_positive: int
    n_target_unlabelled: int
    positives_only: bool
    sensitivity: float
    specificity: float | None
    f1: float | None
    balanced_accuracy: float | None
    confusion: list[list[int]] | None
    labels: str = "stored"  # stored or reviewed (`queries.labels`), for support and target alike ...
    reviewed_rows: dict[str, int] = field(default_factory=dict)  # ... and each table's rows carrying a review

    def to_dict(self) -> dict:
        """A JSON-serialisable dict with the same numbers as the attributes."""
        return asdict(self)


def _encoder(table: VectorTable) -> str:
    """The table's arch, and its stain normaliser when it has one (a fingerprint difference a person can read)."""
    backbone = table.meta["backbone"]
    stain = ((backbone.get("preprocessing") or {}).get("stain") or {}).get("method")
    return f"{backbone.get('arch', '?')}" + (f", stain {stain}" if stain else "")


def check_fingerprints(tables: Sequence[VectorTable]) -> str:
    """The one backbone fingerprint every table shares; otherwise a CytoError naming each table and its fingerprint."""
    prints = {t.fingerprint for t in tables}
    if len(prints) > 1:
        listed = ", ".join(f"{t.name} ({_encoder(t)} {t.fingerprint[:12]})" for t in tables)
        raise CytoError(f"tables hold vectors of different backbones or preprocessing, so they cannot be compared: "
                        f"{listed}; embed them all with one backbone and one --stain")
    return next(iter(prints))


def binary_vectors(table: VectorTable, labels: str = "stored") -> tuple[np.ndarray, np.ndarray, int]:
    """(vectors, binary code 0/1 per row, number of rows left out because their `binary` is null), under `labels`
    (stored or reviewed)."""
    from cytoretrieve.queries.labels import labelled_vectors
    from cytoretrieve.store.tables import require_unique

    vectors, meta, _ = labelled_vectors(table, ["id", "binary"], labels)
    require_unique(table.name, meta.column("id"))
    binary = meta.column("binary").to_pylist()
    keep = np.array([b is not None for b in binary], dtype=bool)
    codes = np.array([int(b) for b in binary if b is not None], dtype=np.int64)
    bad = sorted({int(c) for c in codes} - {0, 1})
    if bad:
        raise CytoError(f"table '{table.name}' has binary values {bad}; only 1 (positive), 0 (negative) or null")
    x = vectors[keep]
    bad_rows = int((~np.isfinite(x)).any(axis=1).sum()) if x.size else 0
    if bad_rows:
        raise CytoError(f"table '{table.name}' has {bad_rows} vector(s) with NaN or inf; re-embed or drop those rows")
    return x, codes, int((~keep).sum())


def select_k(vectors: np.ndarray, codes: np.ndarray, ks: Sequence[int] | None = None, *, folds: int = DEFAULT_FOLDS,
             vote: str = "majority", temperature: float = 0.07, seed: int = 0) -> tuple[int, list[int], list[float]]:
    """k with the best mean weighted F1 over seeded stratified folds (ties: smallest k): (k, ks, curve).

    One neighbour search per fold gives every k at once (`vote_all_k`). With `ks` None the range is 1..50, cut to
    the smallest training fold; an explicit k beyond it is an error.
    """
    from sklearn.model_selection import StratifiedKFold

    _check_vote(vote, temperature)
    if folds < 2:
        raise CytoError(f"cross-validation needs at least 2 folds (got {folds})")
    counts = np.bincount(codes, minlength=2)
    if counts.min() < folds:
        raise CytoError(f"the support has {counts[1]} positive and {counts[0]} negative vectors; {folds}-fold "
                        f"cross-validation needs at least {folds} of each (give `k`, or fewer folds)")
    x = l2_normalise(vectors)
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, codes))
    smallest = min(len(train) for train, _ in splits)
    if ks is None:
        ks = [k for k in DEFAULT_KS if k <= smallest]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise CytoError(f"k values must be positive integers (got {ks})")
    if ks[-1] > smallest:
        raise CytoError(f"k={ks[-1]} exceeds the smallest training fold ({smallest} vectors in {folds}-fold "
                        f"cross-validation); the largest allowed k is {smallest}")
    cols = np.array(ks) - 1
    curves = []
    for train, test in splits:
        sims, idx = exact_neighbours(x[train], x[test], ks[-1])
        preds = vote_all_k(codes[train][idx], sims, 2, vote, temperature)
        curves.append(weighted_f1(confusions_per_k(codes[test], preds[:, cols], 2)))
    curve = np.mean(curves, axis=0)
    return ks[int(np.argmax(curve))], ks, [float(v) for v in curve]


def _ratio(num: int, den: int) -> float:
    return float(num / den) if den else 0.0


def transfer(support: Sequence[VectorTable], target: VectorTable, k: int | None = None, *,
             ks: Sequence[int] | None = None, folds: int = DEFAULT_FOLDS, vote: str = "majority",
             temperature: float = 0.07, seed: int = 0, labels: str = "stored") -> TransferResult:
    """k-NN fitted on the merged binary labels of `support`, evaluated on `target` (see the module docstring);
    `labels`: the stored or the reviewed labels (`queries.labels`) of every table."""
    from cytoretrieve.queries.labels import check_labels, reviewed_count

    _check_vote(vote, temperature)
    check_labels(labels)
    if not support:
        raise CytoError("give at least one support table")
    names = [t.name for t in support]
    if len(set(names)) != len(names):
        raise CytoError(f"a support table is given twice: {', '.join(names)}")
    if target.name in names:
        raise CytoError(f"table '{target.name}' is both support and target: transfer needs another target "
                        "(use `cytoretrieve classify` to evaluate a table on itself)")
    fingerprint = check_fingerprints([*support, target])

    parts = [binary_vectors(t, labels) for t in support]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        missing = "positive" if n_pos == 0 else "negative"
        raise CytoError(f"the support ({'+'.join(names)}) has no {missing} vectors with a binary label; "
                        "k-NN transfer needs both")

    tx, ty, t_unlabelled = binary_vectors(target, labels)
    if len(ty) == 0:
        raise CytoError(f"target table '{target.name}' has no binary labels (every row's binary is null): "
                        "nothing to measure; embed it with a label map giving positives and negatives")
    t_pos = int(ty.sum())
    if t_pos == 0:
        raise CytoError(f"target table '{target.name}' has no positives ({len(ty)} negatives): sensitivity is "
                        "undefined")

    if k is None:
        k, ks_used, curve = select_k(x, y, ks, folds=folds, vote=vote, temperature=temperature, seed=seed)
        selected = True
    else:
        k, ks_used, curve, selected = int(k), [], [], False
    pred = knn_predict(x, y, tx, k, vote=vote, temperature=temperature, n_classes=2)

    tp = int(((pred == 1) & (ty == 1)).sum())
    fn = t_pos - tp
    fp = int(((pred == 1) & (ty == 0)).sum())
    tn = len(ty) - t_pos - fp
    sensitivity = _ratio(tp, t_pos)
    positives_only = t_pos == len(ty)
    specificity = f1 = balanced = confusion = None
    if not positives_only:
        specificity = _ratio(tn, tn + fp)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        balanced = (sensitivity + specificity) / 2
        confusion = [[tn, fp], [fn, tp]]

    return TransferResult(
        support=names, target=target.name, arch=str(target.meta["backbone"].get("arch", "?")),
        fingerprint=fingerprint, vote=vote, temperature=float(temperature), k=k, k_selected=selected,
        ks=ks_used, cv_f1_curve=curve, folds=int(folds) if selected else 0, seed=int(seed),
        n_support=len(y), n_support_positive=n_pos, n_support_unlabelled=sum(p[2] for p in parts),
        n_target=len(ty), n_target_positive=t_pos, n_target_unlabelled=t_unlabelled,
        positives_only=positives_only, sensitivity=sensitivity, specificity=specificity, f1=f1,
        balanced_accuracy=balanced, confusion=confusion, labels=labels,
        reviewed_rows={t.name: reviewed_count(t.store, t.name) for t in [*support, target]},
    )
