"""Slides like this slide: one signature per slide (or field) of a tile or cell table, the nearest slides to one,
and that retrieval judged leave-one-slide-out.

Signatures are a registry, name -> `SignatureKind` (how a slide's vectors become its signature, and how two
signatures compare):
- `mean`: the L2-normalised mean of the slide's (L2-normalised) vectors; similarity = cosine.
- `mosaic`: k-means representatives of the slide (`MOSAIC_K` at most, fewer for a small slide), compared by
  Yottixel's rule, the median over one slide's representatives of the distance to the nearest representative of
  the other (symmetrised by averaging both directions); similarity = 1 - that distance. A rare cell population
  keeps representatives of its own, where a mean drowns it.

Signatures are computed once per table version and cached beside the table's index (`<table>.slides-<kind>-
v<version>.npz`), so asking again is a file read. A slide's own group (patient) is never among its neighbours.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.registry import Registry
from cytoretrieve.store.ann import kmeans, l2_normalise
from cytoretrieve.store.tables import VectorTable

MOSAIC_K = 16  # representatives per slide at most
MOSAIC_SEED = 0


@dataclass(frozen=True)
class SignatureKind:
    """How a slide's vectors (n, d), L2-normalised, become its signature (m, d); and the similarity matrix of a set
    of query signatures against reference signatures (lists of (m_i, d) arrays) -> (queries, references)."""

    name: str
    build: Callable[[np.ndarray], np.ndarray]
    similarity: Callable[[list[np.ndarray], list[np.ndarray]], np.ndarray]
    help: str


SIGNATURES: Registry[SignatureKind] = Registry("slide signature")


def register_signature(kind: SignatureKind) -> SignatureKind:
    return SIGNATURES.add(kind.name, kind)


def signature_kind(name: str) -> SignatureKind:
    return SIGNATURES.lookup(name)


def _mean(x: np.ndarray) -> np.ndarray:
    return l2_normalise(x.mean(axis=0, keepdims=True).astype(np.float32))


def _mean_similarity(queries: list[np.ndarray], refs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(queries) @ np.concatenate(refs).T


def _mosaic(x: np.ndarray) -> np.ndarray:
    k = min(MOSAIC_K, len(x))
    if k == len(x):
        return x.astype(np.float32)
    index = kmeans(np.ascontiguousarray(x, dtype=np.float32), k, niter=10, seed=MOSAIC_SEED, spherical=True,
                   min_points_per_centroid=1, verbose=False)
    centroids = index.reconstruct_n(0, index.ntotal)
    return l2_normalise(np.asarray(centroids, dtype=np.float32))


def _mosaic_similarity(queries: list[np.ndarray], refs: list[np.ndarray]) -> np.ndarray:
    """1 - the mean of both directions' median minimum distance, for every (query, reference) pair.

    Yottixel's rule: the median minimum distance from a to b is the median over a's rows of the cosine distance
    to the nearest row of b.

    One matrix product per query against all references' rows stacked; the per-reference maxima come from
    `maximum.reduceat` over the stacked columns, so the cost is numpy's, not a Python loop over pairs.
    """
    stacked = np.concatenate(refs)
    starts = np.cumsum([0] + [len(r) for r in refs[:-1]])
    out = np.empty((len(queries), len(refs)), np.float32)
    for i, q in enumerate(queries):
        sims = q @ stacked.T  # (query rows, all reference rows)
        q_to_r = np.median(1.0 - np.maximum.reduceat(sims, starts, axis=1), axis=0)
        nearest_q = 1.0 - sims.max(axis=0)
        r_to_q = np.array([np.median(part) for part in np.split(nearest_q, starts[1:])])
        out[i] = 1.0 - (q_to_r + r_to_q) / 2
    return out


register_signature(SignatureKind("mean", _mean, _mean_similarity, "mean of the slide's vectors, cosine"))
register_signature(SignatureKind("mosaic", _mosaic, _mosaic_similarity,
                                 f"k-means representatives (<= {MOSAIC_K}), median of minimum distances (Yottixel)"))


@dataclass
class Signatures:
    """One signature per slide: names, labels, binary classes, groups, and the signature arrays."""

    kind: str
    slides: list[str]
    labels: list[str | None]
    binary: list[int | None]
    groups: list[str | None]
    arrays: list[np.ndarray]

    def index(self, slide: str) -> int:
        try:
            return self.slides.index(slide)
        except ValueError:
            shown = ", ".join(self.slides[:5]) + (" ..." if len(self.slides) > 5 else "")
            raise CytoError(f"no slide '{slide}' in the table (it holds {len(self.slides)}: {shown})") from None


def _cache_path(table: VectorTable, kind: str, group_column: str) -> Path:
    return table.store.index_dir() / f"{table.name}.slides-{kind}-{group_column}-v{table.version}.npz"


def _first(values: list[Any]) -> Any:  # noqa: ANN401
    """The most common non-null value of a slide's rows (its label, class or group)."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def slide_signatures(table: VectorTable, kind: str = "mosaic", *, group_column: str = "slide") -> Signatures:
    """Every slide's signature, computed once per table version and cached beside the table's index."""
    sig = signature_kind(kind)
    if group_column not in table.columns:
        raise CytoError(f"table '{table.name}' has no column `{group_column}` to group its rows into slides")
    path = _cache_path(table, kind, group_column)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = [None if v == "" else v for v in z["meta"].tolist()]
            n = len(z["offsets"]) - 1
            arrays = [z["vectors"][z["offsets"][i]:z["offsets"][i + 1]] for i in range(n)]
            binary = [None if b < 0 else int(b) for b in z["binary"].tolist()]
            return Signatures(kind, meta[:n], meta[n:2 * n], binary, meta[2 * n:], arrays)
    columns = list(dict.fromkeys([group_column, "label", "binary", "group"]))
    vectors, rows = table.vectors(columns)
    slide_of = np.asarray(rows.column(group_column).to_pylist(), dtype=object)
    if vectors.shape[0] == 0 or all(s is None for s in slide_of):
        raise CytoError(f"table '{table.name}' has no rows grouped by `{group_column}`")
    x = l2_normalise(vectors)
    order = sorted({s for s in slide_of if s is not None})
    labels_col, binary_col, group_col = (rows.column(c).to_pylist() for c in ("label", "binary", "group"))
    out = Signatures(kind, [], [], [], [], [])
    for slide in order:
        pick = np.flatnonzero(slide_of == slide)
        out.slides.append(slide)
        out.labels.append(_first([labels_col[i] for i in pick]))
        out.binary.append(_first([binary_col[i] for i in pick]))
        out.groups.append(_first([group_col[i] for i in pick]) or slide)
        out.arrays.append(sig.build(x[pick]))
    _save(path, out)
    return out


def _save(path: Path, s: Signatures) -> None:
    offsets = np.cumsum([0, *(len(a) for a in s.arrays)])
    meta = np.array([v or "" for v in (*s.slides, *s.labels, *s.groups)], dtype=str)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, vectors=np.concatenate(s.arrays), offsets=offsets, meta=meta,
             binary=np.array([-1 if b is None else b for b in s.binary]))
    os.replace(tmp, path)


@dataclass
class SlideHit:
    slide: str
    score: float
    label: str | None
    binary: int | None


@dataclass
class SimilarSlides:
    """The nearest slides to `slide` by `kind` signatures, its own group left out."""

    table: str
    slide: str
    kind: str
    label: str | None
    hits: list[SlideHit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def similar_slides(table: VectorTable, slide: str, *, kind: str = "mosaic", k: int = 5,
                   group_column: str = "slide") -> SimilarSlides:
    """The `k` slides whose signatures are nearest to `slide`'s, with their labels; slides of its group excluded."""
    if k < 1:
        raise CytoError(f"`k` must be at least 1, not {k}")
    s = slide_signatures(table, kind, group_column=group_column)
    i = s.index(slide)
    sims = signature_kind(kind).similarity([s.arrays[i]], s.arrays)[0]
    order = [j for j in np.argsort(-sims, kind="stable") if s.groups[j] != s.groups[i] and j != i][:k]
    return SimilarSlides(table.name, slide, kind, s.labels[i],
                         [SlideHit(s.slides[j], float(sims[j]), s.labels[j], s.binary[j]) for j in order])


@dataclass
class SlideRetrieval:
    """Leave-one-slide-out retrieval by slide label: Top-1 and Top-3 (a hit among the first 1 / 3 has the query's
    label) and majority vote at 5 (the most common label of the first 5 is the query's)."""

    kind: str
    slides: int
    top1: float
    top3: float
    mv5: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_slide_retrieval(signatures: Signatures) -> SlideRetrieval:
    """Each labelled slide queries the others (its own group left out), judged by its label."""
    s = signatures
    sims = signature_kind(s.kind).similarity(s.arrays, s.arrays)
    labelled = [i for i, lab in enumerate(s.labels) if lab is not None]
    if len(labelled) < 2:
        raise CytoError("slide retrieval needs at least 2 labelled slides")
    top1 = top3 = mv5 = 0
    groups = np.asarray(s.groups, dtype=object)
    for i in labelled:
        keep = [j for j in np.argsort(-sims[i], kind="stable") if groups[j] != groups[i] and s.labels[j] is not None]
        labels = [s.labels[j] for j in keep[:5]]
        top1 += labels[:1] == [s.labels[i]]
        top3 += s.labels[i] in labels[:3]
        counts = Counter(labels).most_common()
        mv5 += bool(counts) and counts[0][0] == s.labels[i] and (len(counts) == 1 or counts[1][1] < counts[0][1])
    n = len(labelled)
    return SlideRetrieval(s.kind, n, top1 / n, top3 / n, mv5 / n)
