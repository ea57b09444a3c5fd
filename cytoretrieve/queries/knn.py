"""The paper's k-NN classification protocol, run on stored vectors (no re-embedding).

Protocol: `runs` seeded stratified train/test splits; cosine k-NN (L2-normalised vectors, exact inner product in
FAISS); one search per run with k_max neighbours, from which every k in the range is derived at once (one-hot
neighbour labels x vote weights, cumulative sum over the neighbour axis, argmax per k); weighted F1 per k;
k* = the k with the best mean weighted F1 over runs; at k*: class-wise F1, binary (positive / negative) F1 and
weighted F1, each mean +- std over runs, plus the confusion matrix summed over runs.

Std is the population std (numpy's default, ddof=0): it is defined for a single run, and the paper does not say
which it used. Ties: majority votes break count ties by the larger summed similarity, then by class order;
weighted votes break exact ties by class order; k* ties go to the smallest k.

Votes are a registry, `VOTES` (name -> `Vote`: a function giving every k's prediction at once, and its help);
`register_vote` adds one. `vote_all_k` applies them; `classify` and `knn_predict` (used by search and transfer) both
call it. Light to import (numpy; FAISS is loaded by the searches), so the CLI lists the votes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.stats import mean_std
from cytoretrieve.registry import Registry
from cytoretrieve.store.ann import exact_neighbours, l2_normalise

_VOTE_CHUNK = 2048  # query rows voted at once: bounds the (rows, k, classes) arrays for large query sets


@dataclass
class ClassifyResult:
    """Everything `classify` measured; numbers are plain Python types so `to_dict` is JSON-able as is."""

    classes: list[str]
    ks: list[int]
    vote: str
    temperature: float
    runs: int
    train_fraction: float
    seed: int
    f1_curve_mean: list[float]
    f1_curve_std: list[float]
    k_best: int
    class_f1_mean: dict[str, float]
    class_f1_std: dict[str, float]
    pos_f1_mean: float | None
    pos_f1_std: float | None
    neg_f1_mean: float | None
    neg_f1_std: float | None
    weighted_f1_mean: float
    weighted_f1_std: float
    confusion: list[list[int]]
    n_train: int
    n_test: int
    n_unlabelled: int = 0
    weighted_f1_runs: list[float] = field(default_factory=list)  # at k*, one per split: for paired comparisons
    labels: str = "stored"  # stored or reviewed (`queries.labels`) ...
    reviewed_rows: int = 0  # ... and how many of the table's rows carry a review

    def to_dict(self) -> dict:
        """A JSON-serialisable dict with the same numbers as the attributes."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------------- basics


def parse_ks(spec: str) -> list[int]:
    """Parse a k spec such as "1-100", "5", "1,3,5,10" or "1-20,50" into sorted unique positive ints."""
    ks: set[int] = set()
    parts = [p.strip() for p in str(spec).split(",")]
    for part in parts:
        single = re.fullmatch(r"\d+", part)
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if single:
            lo = hi = int(part)
        elif span:
            lo, hi = int(span.group(1)), int(span.group(2))
        else:
            raise CytoError(f"bad k spec {spec!r}: use e.g. '1-100', '5', '1,3,5,10' or '1-20,50'")
        if lo < 1 or hi < lo:
            raise CytoError(f"bad k spec {spec!r}: k values must be >= 1 and ranges must go low-high")
        ks.update(range(lo, hi + 1))
    return sorted(ks)


# ------------------------------------------------------------------------------------------------------ votes

# (neighbour class codes (n, k_max), their similarities (n, k_max), n_classes, temperature) -> (n, k_max) class
# codes: column j is the vote of the first j+1 neighbours
VoteFn = Callable[[np.ndarray, np.ndarray, int, float], np.ndarray]


# the same inputs -> (n, C) class scores of the vote over all k_max neighbours (its argmax is the vote's last
# column): how sure the vote is, for `labels suggest` (None: the vote gives no scores)
ScoreFn = Callable[[np.ndarray, np.ndarray, int, float], np.ndarray]


@dataclass(frozen=True)
class Vote:
    name: str
    fn: VoteFn
    help: str  # one phrase, shown by the CLI's --vote help
    scores: ScoreFn | None = None


VOTES: Registry[Vote] = Registry("vote")


def register_vote(name: str, fn: VoteFn, help: str, scores: ScoreFn | None = None) -> Vote:
    """Add (or replace) the vote `name`; returns its record."""
    return VOTES.add(name, Vote(name, fn, help, scores))


def votes_help() -> str:
    """Every vote with its help, for the CLI."""
    return VOTES.help(lambda v: v.help)


def cumulative_scores(codes: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, k, C) running per-class sums of `weights` over the first 1..k neighbours."""
    scores = np.zeros((*codes.shape, n_classes), dtype=np.float64)
    np.put_along_axis(scores, codes[..., None], weights[..., None], axis=2)
    return np.cumsum(scores, axis=1, out=scores)


def _majority(codes: np.ndarray, sims: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    """One vote per neighbour; count ties go to the larger summed similarity, then to class order."""
    counts = cumulative_scores(codes, np.ones_like(sims), n_classes)
    sim_sums = cumulative_scores(codes, sims, n_classes)
    tied = counts == counts.max(axis=2, keepdims=True)
    return np.where(tied, sim_sums, -np.inf).argmax(axis=2)  # argmax takes the first: class order breaks ties


def _weighted(codes: np.ndarray, sims: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    """DINO's vote: each neighbour adds exp(sim / T) to its class (shifted by the row's best similarity, which
    scales a row's weights by one constant, so the argmax is unchanged but small T cannot overflow)."""
    shifted = (sims - sims.max(axis=1, keepdims=True)) / temperature
    return cumulative_scores(codes, np.exp(shifted), n_classes).argmax(axis=2)


def _majority_scores(codes: np.ndarray, sims: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    return cumulative_scores(codes, np.ones_like(sims), n_classes)[:, -1]


def _weighted_scores(codes: np.ndarray, sims: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    shifted = (sims - sims.max(axis=1, keepdims=True)) / temperature
    return cumulative_scores(codes, np.exp(shifted), n_classes)[:, -1]


register_vote("majority", _majority, "one vote per neighbour", _majority_scores)
register_vote("weighted", _weighted, "DINO, each neighbour votes exp(sim/T)", _weighted_scores)


def vote_margin(neighbour_codes: np.ndarray, sims: np.ndarray, n_classes: int, vote: str,
                temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(winning class code, margin) per query of the vote over all its neighbours: margin = the winner's share of
    the vote minus the runner-up's (0 = a tie, 1 = unanimous), by the vote's `scores`."""
    _check_vote(vote, temperature)
    if VOTES[vote].scores is None:
        raise CytoError(f"vote {vote!r} gives no scores, so no margin: use one of "
                        f"{', '.join(v.name for v in VOTES.values() if v.scores)}")
    scores = VOTES[vote].scores(np.asarray(neighbour_codes, np.int64), np.asarray(sims, np.float64), n_classes,
                                temperature)
    share = scores / np.maximum(scores.sum(axis=1, keepdims=True), 1e-300)
    top2 = -np.sort(-share, axis=1)[:, :2] if n_classes > 1 else np.c_[share, np.zeros(len(share))]
    return share.argmax(axis=1), top2[:, 0] - top2[:, 1]


def _check_vote(vote: str, temperature: float) -> None:
    VOTES.lookup(vote)
    if not temperature > 0:
        raise CytoError(f"temperature must be > 0 (got {temperature})")


# ---------------------------------------------------------------------------------------------------- neighbours


def vote_all_k(neighbour_codes: np.ndarray, sims: np.ndarray, n_classes: int, vote: str,
               temperature: float) -> np.ndarray:
    """Predicted class code for every k = 1..k_max at once: (n_query, k_max) from (n_query, k_max) neighbours,
    by the vote `VOTES[vote]`. Column j is the prediction using the first j+1 neighbours."""
    _check_vote(vote, temperature)
    codes = np.asarray(neighbour_codes, dtype=np.int64)
    sims = np.asarray(sims, dtype=np.float64)
    out = np.empty(codes.shape, dtype=np.int64)
    for start in range(0, codes.shape[0], _VOTE_CHUNK):
        rows = slice(start, start + _VOTE_CHUNK)
        if codes[rows].size:
            out[rows] = VOTES[vote].fn(codes[rows], sims[rows], n_classes, temperature)
    return out


def knn_predict(train_vectors: np.ndarray, train_labels_codes: np.ndarray, query_vectors: np.ndarray, k: int,
                vote: str = "majority", temperature: float = 0.07, n_classes: int | None = None) -> np.ndarray:
    """Class codes predicted for each query by a k-NN vote over the training vectors (cosine, exact search)."""
    _check_vote(vote, temperature)
    train_codes = np.asarray(train_labels_codes, dtype=np.int64)
    train = l2_normalise(train_vectors)
    if len(train) != len(train_codes):
        raise CytoError(f"{len(train)} training vectors but {len(train_codes)} labels")
    if not 1 <= k <= len(train):
        raise CytoError(f"k={k} is out of range: use 1..{len(train)} (the number of training vectors)")
    n_classes = int(train_codes.max()) + 1 if n_classes is None else n_classes
    sims, idx = exact_neighbours(train, l2_normalise(query_vectors), k)
    return vote_all_k(train_codes[idx], sims, n_classes, vote, temperature)[:, k - 1]


# ----------------------------------------------------------------------------------------------------- metrics


def confusions_per_k(truth: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_k, C, C) confusion matrices (rows = truth, cols = prediction) for prediction columns (n, n_k)."""
    n_k = preds.shape[1]
    flat = np.arange(n_k)[None, :] * n_classes * n_classes + truth[:, None] * n_classes + preds
    return np.bincount(flat.ravel(), minlength=n_k * n_classes * n_classes).reshape(n_k, n_classes, n_classes)


def class_f1(confusion: np.ndarray) -> np.ndarray:
    """Per-class F1 from confusion matrices (..., C, C); 0 for a class with no truth and no predictions (as sklearn)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    denom = confusion.sum(axis=-1) + confusion.sum(axis=-2)  # 2TP + FP + FN
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def weighted_f1(confusion: np.ndarray) -> np.ndarray:
    """Support-weighted mean of class F1, equal to sklearn's f1_score(average="weighted")."""
    support = confusion.sum(axis=-1)
    return (class_f1(confusion) * support).sum(axis=-1) / support.sum(axis=-1)


def _side_f1(confusion: np.ndarray, side: np.ndarray, other: np.ndarray) -> float:
    """Binary F1 of one side after collapsing classes; truth rows outside both sides are ignored, and a prediction
    of a class outside `side` is a miss (so predicting a class with binary None is wrong for either side)."""
    tp = confusion[np.ix_(side, side)].sum()
    fn = confusion[side].sum() - tp
    fp = confusion[np.ix_(other, side)].sum()
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def binary_f1(confusion: np.ndarray, binary_codes: Sequence[int | None]) -> tuple[float, float]:
    """(positive F1, negative F1) from a fine-class confusion matrix and each class's binary value (1, 0, None)."""
    pos = np.array([b == 1 for b in binary_codes])
    neg = np.array([b == 0 for b in binary_codes])
    return _side_f1(confusion, pos, neg), _side_f1(confusion, neg, pos)


# -------------------------------------------------------------------------------------------------- the protocol


def _labelled_codes(labels: Sequence[str | None],
                    classes: Sequence[str] | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(classes, labelled-row mask, class code per labelled row); unknown labels or tiny classes -> CytoError."""
    names = [None if lab is None or lab == "" else str(lab) for lab in labels]
    mask = np.array([n is not None for n in names], dtype=bool)
    present = [n for n in names if n is not None]
    classes = sorted(set(present)) if classes is None else [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise CytoError(f"duplicate class codes in {classes}")
    if len(classes) < 2:
        found = ", ".join(classes) or "none"
        raise CytoError(f"k-NN classification needs at least 2 classes, found {len(classes)} ({found})")
    position = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(present) - set(position))
    if unknown:
        raise CytoError(f"labels {unknown} are not among the classes {classes}")
    codes = np.array([position[n] for n in present], dtype=np.int64)
    counts = np.bincount(codes, minlength=len(classes))
    for c, count in zip(classes, counts):
        if count < 2:
            raise CytoError(f"class {c!r} has {count} labelled vector(s); a stratified split needs >= 2: "
                            "remove that class")
    return classes, mask, codes


def _binary_codes(binary: Mapping[str, int | None] | None, classes: list[str]) -> list[int | None] | None:
    if binary is None:
        return None
    missing = [c for c in classes if c not in binary]
    if missing:
        raise CytoError(f"binary mapping has no entry for classes {missing}")
    bad = {c: binary[c] for c in classes if binary[c] not in (0, 1, None)}
    if bad:
        raise CytoError(f"binary mapping values must be 1 (positive), 0 (negative) or None, got {bad}")
    return [None if binary[c] is None else int(binary[c]) for c in classes]


def _check_inputs(vectors: np.ndarray, n_labels: int, runs: int, train_fraction: float, ks: list[int],
                  vote: str, temperature: float) -> None:
    if vectors.ndim != 2:
        raise CytoError(f"vectors must be a 2-D array (rows x dims), got shape {vectors.shape}")
    if len(vectors) != n_labels:
        raise CytoError(f"{len(vectors)} vectors but {n_labels} labels")
    bad_rows = int((~np.isfinite(vectors)).any(axis=1).sum())
    if bad_rows:
        raise CytoError(f"{bad_rows} vector(s) contain NaN or inf; re-embed or drop those rows")
    if not 0 < train_fraction < 1:
        raise CytoError(f"train fraction must be strictly between 0 and 1 (got {train_fraction})")
    if runs < 1:
        raise CytoError(f"runs must be >= 1 (got {runs})")
    if not ks or min(ks) < 1:
        raise CytoError(f"k values must be positive integers (got {ks})")
    _check_vote(vote, temperature)


def _splits(codes: np.ndarray, runs: int, train_fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified (train, test) index splits; run r uses seed + r. Each is the split scikit-learn's
    `train_test_split(rows, train_size=train_fraction, stratify=codes, random_state=seed + r)` makes, drawn here
    with the same random stream (`stratified_split`): importing scikit-learn took over a second of every
    `classify` (tests/queries compare the two)."""
    return [stratified_split(codes, train_fraction, seed + r) for r in range(runs)]


def stratified_split(codes: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of a stratified shuffle split of rows 0..n-1 by class `codes`: scikit-learn's
    StratifiedShuffleSplit (1.x) step by step, on numpy's RandomState(seed), so the rows are the same."""
    codes = np.asarray(codes)
    n = len(codes)
    n_train = math.floor(train_fraction * n)
    n_test = n - n_train
    classes, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    if n_train == 0 or n_test == 0:
        raise CytoError(f"cannot make a stratified split at train fraction {train_fraction}: {n} rows leave an "
                        "empty train or test set")
    for size, side in ((n_train, "train"), (n_test, "test")):
        if size < len(classes):
            raise CytoError(f"cannot make a stratified split at train fraction {train_fraction}: the {side} split "
                            f"({size} rows) is smaller than the number of classes ({len(classes)})")
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        rows = by_class[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(rows[:n_i[i]])
        test.extend(rows[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws near the mode of the multivariate hypergeometric (scikit-learn's rule: floors, then the
    largest remainders, ties broken at random)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (at,) = np.where(remainder == value)
            add = min(len(at), need)
            floored[rng.choice(at, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def classify(vectors: np.ndarray, labels: Sequence[str | None], *, classes: Sequence[str] | None = None,
             binary: Mapping[str, int | None] | None = None, runs: int = 4, train_fraction: float = 0.75,
             ks: Sequence[int] = range(1, 101), vote: str = "majority", temperature: float = 0.07,
             seed: int = 0) -> ClassifyResult:
    """Run the k-NN protocol on stored vectors; rows whose label is None or empty are left out (n_unlabelled)."""
    vectors = np.asarray(vectors)
    ks = sorted({int(k) for k in ks})
    _check_inputs(vectors, len(labels), runs, train_fraction, ks, vote, temperature)
    classes, mask, codes = _labelled_codes(labels, classes)
    binary_codes = _binary_codes(binary, classes)
    x = l2_normalise(vectors[mask])
    n_classes, k_max = len(classes), ks[-1]

    splits = _splits(codes, runs, train_fraction, seed)
    n_train, n_test = len(splits[0][0]), len(splits[0][1])
    if k_max > n_train:
        raise CytoError(f"k={k_max} exceeds the training split ({n_train} vectors at train fraction "
                        f"{train_fraction}); the largest allowed k is {n_train}")

    k_cols = np.array(ks) - 1
    confusions = []  # per run: (n_ks, C, C)
    for train, test in splits:
        sims, idx = exact_neighbours(x[train], x[test], k_max)
        preds = vote_all_k(codes[train][idx], sims, n_classes, vote, temperature)
        confusions.append(confusions_per_k(codes[test], preds[:, k_cols], n_classes))
    confusions = np.stack(confusions)  # (runs, n_ks, C, C)

    per_run = weighted_f1(confusions)  # (runs, n_ks)
    curve_mean, curve_std = mean_std(per_run)
    best = int(np.argmax(curve_mean))  # first maximum: the smallest k among ties
    at_best = confusions[:, best]  # (runs, C, C)
    cls_mean, cls_std = mean_std(class_f1(at_best))
    pos_mean = pos_std = neg_mean = neg_std = None
    if binary_codes is not None:
        pos_neg = np.array([binary_f1(conf, binary_codes) for conf in at_best])  # (runs, 2)
        (pos_mean, neg_mean), (pos_std, neg_std) = (map(float, v) for v in mean_std(pos_neg))

    return ClassifyResult(
        classes=classes, ks=ks, vote=vote, temperature=float(temperature), runs=int(runs),
        train_fraction=float(train_fraction), seed=int(seed),
        f1_curve_mean=[float(v) for v in curve_mean], f1_curve_std=[float(v) for v in curve_std],
        k_best=ks[best],
        class_f1_mean={c: float(v) for c, v in zip(classes, cls_mean)},
        class_f1_std={c: float(v) for c, v in zip(classes, cls_std)},
        pos_f1_mean=pos_mean, pos_f1_std=pos_std, neg_f1_mean=neg_mean, neg_f1_std=neg_std,
        weighted_f1_mean=float(curve_mean[best]), weighted_f1_std=float(curve_std[best]),
        confusion=at_best.sum(axis=0).astype(int).tolist(),
        n_train=n_train, n_test=n_test, n_unlabelled=int((~mask).sum()),
        weighted_f1_runs=[float(v) for v in per_run[:, best]],
    )


# ------------------------------------------------------------------------------------------------ over a table


def majority_label(neighbours: Sequence[tuple[str, float]]) -> str:
    """The majority label of (label, similarity) neighbours, best first, with `vote_all_k`'s tie rule."""
    classes = sorted({label for label, _ in neighbours})
    codes = np.array([[classes.index(label) for label, _ in neighbours]])
    sims = np.array([[sim for _, sim in neighbours]])
    return classes[int(vote_all_k(codes, sims, len(classes), "majority", 0.07)[0, -1])]


def tied_labels(neighbours: Sequence[tuple[str, float]]) -> list[str]:
    """The labels that share the most votes among (label, similarity) neighbours: one label when a majority (or
    plurality) leads, several when they tie, the one `majority_label` picks by its tie rule first."""
    counts = Counter(label for label, _ in neighbours)
    if not counts:
        return []
    top = max(counts.values())
    tied = [label for label, n in counts.items() if n == top]
    if len(tied) == 1:
        return tied
    pick = majority_label(neighbours)
    summed = {label: sum(s for lab, s in neighbours if lab == label) for label in tied}
    return sorted(tied, key=lambda label: (label != pick, -summed[label]))


def classify_table(table, labels: str = "stored", **kwargs) -> ClassifyResult:  # noqa: ANN001 - a store.VectorTable
    """`classify` over a store table's vectors and labels (`labels`: stored or reviewed, see `queries.labels`), with
    the class order and binary mapping it records. `table` may be the table's current snapshot instead
    (`queries.labelled_snapshot.read`): the same rows, read without LanceDB, and so the same result."""
    from cytoretrieve.store.snapshot import Snapshot

    if isinstance(table, Snapshot):
        from cytoretrieve.queries.labelled_snapshot import labelled

        vectors, row_labels, reviewed_rows = labelled(table, labels)
    else:
        from cytoretrieve.queries.labels import labelled_vectors
        from cytoretrieve.store.tables import require_unique

        vectors, meta, used = labelled_vectors(table, ["id", "label"], labels)
        require_unique(table.name, meta.column("id"))
        row_labels, reviewed_rows = meta.column("label").to_pylist(), used.reviewed_rows
    label_map = table.labels or {}
    present = set(row_labels)
    classes = [c for c in label_map.get("classes", []) if c in present] or None
    if classes is not None:
        classes += sorted(c for c in present - set(classes) if c)
    mapping = label_map.get("binary")
    binary = {c: mapping.get(c) for c in classes or sorted(c for c in present if c)} if mapping else None
    result = classify(vectors, row_labels, classes=classes, binary=binary, **kwargs)
    result.labels, result.reviewed_rows = labels, reviewed_rows
    return result
