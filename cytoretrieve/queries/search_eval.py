"""Search judged as classification (`search --evaluate`): would the top hits have voted for the right class?

Leave-one-out over the labelled rows of one table, as retrieval papers in pathology score a store (SISH, RetCCL,
Yottixel): every labelled row queries the table's own FAISS index (`table_index`) and its hits are the other
labelled rows. Reported per class and overall (every query counts once), for the labels and again for the
binary classes:
- top-k accuracy: a hit of the query's class among its first k hits (k in `ks`, 1, 3, 5 by default);
- mMV@k: the majority vote of the first k hits (k = the largest of `ks`) is the query's class (ties as `vote_all_k`).

When rows carry a group (patient, slide) or a slide (tiles), hits from the query's own group are left out: cells
of one slide look alike for reasons that have nothing to do with their class, and would flatter the score.
FAISS is asked for 2k + 1 hits per query, and again for more for the queries their own group's hits left short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.knn import vote_all_k
from cytoretrieve.store.ann import l2_normalise
from cytoretrieve.store.index import table_index
from cytoretrieve.store.tables import VectorTable

DEFAULT_KS = (1, 3, 5)
QUERY_BATCH = 4096  # queries searched at once ...
HITS_PER_BATCH = 1 << 24  # ... or fewer, so that one batch's hits stay ~200 MB


@dataclass
class ClassScores:
    """Top-k accuracy per k and the majority vote of the top `mv_k`, over the `n` queries of one class (or all)."""

    name: str
    n: int
    top: dict[int, float]
    mv: float


@dataclass
class LabelEvaluation:
    """One label kind (`label` or `binary`): per class and overall."""

    kind: str
    classes: list[ClassScores]
    overall: ClassScores
    queries_without_hits: int = 0


@dataclass
class SearchEvaluation:
    table: str
    ks: list[int]
    mv_k: int
    exclusion: str  # what was left out of each query's hits, in words
    evaluations: list[LabelEvaluation] = field(default_factory=list)
    labels: str = "stored"  # stored or reviewed (`queries.labels`) ...
    reviewed_rows: int = 0  # ... and how many of the table's rows carry a review

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups(meta: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """The exclusion group of each row (its group, else its slide, else itself) and what that means in words."""
    group = np.array([g if g is not None else s for g, s in zip(meta["group"], meta["slide"])], dtype=object)
    if all(g is None for g in group):
        return np.arange(len(group)).astype(str).astype(object), "the query row itself"
    what = "the query's own slide" if all(g is None for g in meta["group"]) else "the query's own group (slide / patient)"
    missing = np.array([g is None for g in group])
    group[missing] = np.char.add("row:", np.flatnonzero(missing).astype(str)).astype(object)
    return group, f"{what} (and the query row itself)"


def _positions(sorted_keys: np.ndarray, order: np.ndarray, hit_keys: np.ndarray) -> np.ndarray:
    """Pool position of each hit key (-1 for FAISS's padding and keys outside the pool)."""
    at = np.minimum(np.searchsorted(sorted_keys, hit_keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == hit_keys, order[at], -1)


def _neighbours(table: VectorTable, vectors: np.ndarray, keys: np.ndarray, group_codes: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(positions, sims) of each pool row's first `k` hits in the pool outside its own group: (n, k), -1 = none.

    Each query asks FAISS for 2k + 1 hits first; the queries left short by their own group's hits ask again for 4x
    as many, until they have k or have seen the whole pool.
    """
    index = table_index(table)
    allowed = keys if len(keys) < index.rows else None  # the pool is part of the table: only its rows are hits
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    n = len(keys)
    out_pos = np.full((n, k), -1, dtype=np.int64)
    out_sim = np.zeros((n, k), dtype=np.float32)
    todo, want = np.arange(n), 2 * k + 1
    while len(todo):
        want = min(want, n)
        short: list[np.ndarray] = []
        step = max(1, min(QUERY_BATCH, HITS_PER_BATCH // want))
        for start in range(0, len(todo), step):
            rows = todo[start:start + step]
            sims, hit_keys = index.search(vectors[rows], want, allowed)
            pos = _positions(sorted_keys, order, hit_keys)
            keep = (pos >= 0) & (group_codes[np.maximum(pos, 0)] != group_codes[rows][:, None])
            rank = np.cumsum(keep, axis=1)
            r, c = np.nonzero(keep & (rank <= k))
            out_pos[rows[r], rank[r, c] - 1] = pos[r, c]
            out_sim[rows[r], rank[r, c] - 1] = sims[r, c]
            if want < n:
                short.append(rows[rank[:, -1] < k])
        todo, want = (np.concatenate(short) if short else np.zeros(0, np.int64)), want * 4
    return out_pos, out_sim


def _score(name: str, correct: np.ndarray, mv_right: np.ndarray, ks: Sequence[int]) -> ClassScores:
    n = len(correct)
    top = {k: round(float(correct[:, :k].any(axis=1).mean()), 4) if n else 0.0 for k in ks}
    return ClassScores(name, n, top, round(float(mv_right.mean()), 4) if n else 0.0)


def _evaluate_kind(kind: str, codes: np.ndarray, names: list[str], pos: np.ndarray, sims: np.ndarray,
                   ks: Sequence[int], mv_k: int) -> LabelEvaluation:
    """Scores of one label kind from each query's neighbour positions (-1 = no hit)."""
    has = pos >= 0
    hit_codes = np.where(has, codes[np.maximum(pos, 0)], -1)
    correct = (hit_codes == codes[:, None]) & has
    voters = np.where(has[:, :mv_k], hit_codes[:, :mv_k], len(names))  # missing hits vote for a non-class
    votes = vote_all_k(voters, np.where(has[:, :mv_k], sims[:, :mv_k], 0.0), len(names) + 1, "majority", 1.0)
    mv_right = votes[:, -1] == codes
    per_class = [_score(c, correct[codes == i], mv_right[codes == i], ks) for i, c in enumerate(names)]
    return LabelEvaluation(kind, [c for c in per_class if c.n], _score("overall", correct, mv_right, ks),
                           int((~has[:, 0]).sum()))


def _kind_codes(values: Sequence[Any], kind: str, order: Sequence[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(codes of the labelled rows, class names, mask of labelled rows) for one label kind."""
    if kind == "binary":
        named = [{1: "positive", 0: "negative"}.get(v) if v is not None else None for v in values]
        order = ["positive", "negative"]
    else:
        named = list(values)
    mask = np.array([v is not None for v in named], dtype=bool)
    present = {v for v in named if v is not None}
    names = [c for c in order if c in present] + sorted(present - set(order))
    lookup = {c: i for i, c in enumerate(names)}
    return np.array([lookup[v] for v in named if v is not None], dtype=np.int64), names, mask


def evaluate_search(table: VectorTable, ks: Sequence[int] = DEFAULT_KS, labels: str = "stored") -> SearchEvaluation:
    """Leave-one-out top-k accuracy and mMV@max(ks) of the table's labelled rows, for labels and binary classes
    (`labels`: the stored or the reviewed ones, see `queries.labels`)."""
    from cytoretrieve.queries.labels import labelled_vectors

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise CytoError(f"`k` values must be at least 1, not {ks}")
    vectors, meta_table, used = labelled_vectors(table, ["key", "label", "binary", "group", "slide"], labels)
    meta = {c: np.array(meta_table.column(c).to_pylist(), dtype=object) for c in meta_table.column_names}
    groups, exclusion = _groups(meta)
    order = (table.labels or {}).get("classes", [])
    result = SearchEvaluation(table.name, ks, ks[-1], exclusion, labels=used.labels, reviewed_rows=used.reviewed_rows)
    for kind in ("label", "binary"):
        codes, names, mask = _kind_codes(list(meta[kind]), kind, order)
        if len(names) < 2 or mask.sum() < 2:
            continue
        _, group_codes = np.unique(groups[mask].astype(str), return_inverse=True)
        pos, sims = _neighbours(table, l2_normalise(vectors[mask]), meta["key"][mask].astype(np.int64),
                                group_codes, ks[-1])
        result.evaluations.append(_evaluate_kind(kind, codes, names, pos, sims, ks, ks[-1]))
    if not result.evaluations:
        raise CytoError(f"table '{table.name}' has fewer than two labelled classes: nothing to evaluate with `evaluate`")
    return result
