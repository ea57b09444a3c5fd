"""The training-free retrieval score: no model is trained, only FAISS searches over stored vectors.

For a fold, two reference sets are indexed (cosine similarity: L2-normalised vectors, inner product):
- positives: annotated positive cell / tile vectors (`positives`), or, when none are given, every instance of
  the positive training bags (noisy: most tiles of a positive slide are normal);
- negatives: every instance of the negative training bags (a negative slide's tiles are all negative).

Tile score = mean similarity to its `k` nearest positives - mean similarity to its `k` nearest negatives.
Slide score = mean of its `top_m` highest tile scores (all of them when it has fewer).

Search (`RetrievalConfig.index`): a reference set of at most `exact_max` vectors is searched exactly
(IndexFlatIP). A larger one (the tiles of a cohort's training slides: 10^5-10^6 vectors) gets an IVF index with
4-bit PQ fast-scan codes (one sub-quantizer per 2 dimensions) whose `refine` x k best candidates per query are
re-ranked by their inner product with float16 copies of the references (FAISS
`IVF{nlist},PQ{d/2}x4fs,Refine(SQfp16)`): the k neighbours returned carry their (float16-exact) similarities, and
the index holds ~0.9 KB per 384-d reference instead of 1.5 KB. On 370k synthetic clustered references its recall@10
and tile-score error match those of the IVFFlat index this module used before (nlist 4 sqrt(n), nprobe 16), at
~3x its search speed and a fifth of its build time. Exact search costs one pass over every reference per tile, out
of reach for a cohort (1.5M tiles x 2 x 370k references: hours on two cores); `benchmarks/mil_scale.py` measures
the recall and the tile-score error of the IVF index against exact search. `ivf` (IVFFlat, float32 references,
this config's nlist / nprobe) is there for comparison.

Queries: the tiles of several slides are searched together (`query_batch` rows), grouped by the nearest of 64
centres of the IVF lists, so that consecutive queries re-rank neighbouring references while those are in the CPU
cache (1.35x faster on two cores in one measurement; each query's result does not depend on its batch); scores
come back in the tiles' order. Bags may be arrays or any sequence that reads a bag on `[i]`
(`bags.StoredVectors`): each bag is read once per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil.bags import Bags, StoredVectors

INDEXES = ("auto", "flat", "ivf", "ivfpq")
SEARCH_SLICE = 16_384  # queries per FAISS call (IVF-PQ + refine holds refine x k candidates per query meanwhile)
SORT_GROUPS = 64  # query order: by the nearest of this many centres (k-means of the IVF centroids)


@dataclass
class RetrievalConfig:
    k: int = 10
    top_m: int = 10
    query_batch: int = 65_536  # tiles searched together (several slides' worth)
    index: str = "auto"  # auto: flat up to exact_max references, else ivfpq; or flat, ivf, ivfpq
    exact_max: int = 50_000
    nlist: int = 0  # IVF lists; 0: the power of two nearest 2 sqrt(n), 16-4096
    nprobe: int = 12  # IVF lists visited per query
    refine: int = 12  # ivfpq: candidates re-ranked (exact, float16 copies) per neighbour wanted
    sort_queries: bool = True  # search grouped by IVF region (same results, faster)
    seed: int = 0  # of the IVF training sample and k-means

    def to_dict(self) -> dict:
        return asdict(self)


def slide_score(tile_scores: np.ndarray, top_m: int) -> float:
    """Mean of the `top_m` highest tile scores."""
    s = np.sort(np.asarray(tile_scores, dtype=np.float64))[::-1]
    return float(s[: max(1, top_m)].mean()) if len(s) else float("nan")


def build_references(chunks: Sequence[np.ndarray], dim: int, config: RetrievalConfig) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product index of the L2-normalised rows of `chunks` (ids: rows in chunk order), and a
    description of it (kind, rows, nlist, nprobe, refine). The chunks are added in batches: no concatenated copy."""
    from cytoretrieve.store.index import IndexParams, build_index

    n = int(sum(chunks.sizes() if isinstance(chunks, StoredVectors) else [len(c) for c in chunks]))
    if n == 0:
        raise CytoError("the retrieval method has an empty reference set")
    kind = config.index
    if kind not in INDEXES:
        raise CytoError(f"unknown retrieval index '{kind}' (one of {', '.join(INDEXES)})")
    if kind == "auto":
        kind = "flat" if n <= config.exact_max else "ivfpq"
    params = IndexParams(nlist=config.nlist, nprobe=config.nprobe, refine=config.refine, seed=config.seed)
    return build_index(chunks, kind, params)


def _as_chunks(x: np.ndarray | Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    return [x] if isinstance(x, np.ndarray) else x


def _mean_hits(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean similarity of the neighbours found (FAISS pads missing ones with id -1)."""
    found = ids >= 0
    if found.all():
        return scores.mean(1)
    return np.where(found, scores, 0).sum(1) / np.maximum(found.sum(1), 1)


class RetrievalScorer:
    """Indexes of the positive and negative references; `predict(bags)` -> (slide scores, tile scores per slide)."""

    def __init__(self, positives: np.ndarray | Sequence[np.ndarray], negatives: np.ndarray | Sequence[np.ndarray],
                 config: RetrievalConfig) -> None:
        import faiss

        self.config = config
        pos, neg = _as_chunks(positives), _as_chunks(negatives)
        dim = next(int(np.asarray(c).shape[1]) for c in (pos[0], neg[0]))
        self.pos, self.pos_info = build_references(pos, dim, config)
        self.neg, self.neg_info = build_references(neg, dim, config)
        self.k_pos = min(config.k, self.pos.ntotal)
        self.k_neg = min(config.k, self.neg.ntotal)
        # queries are ordered by their nearest of SORT_GROUPS centres: a k-means of an IVF index's list centroids
        self._sorter = None
        if config.sort_queries:
            for index in (self.pos, self.neg):
                ivf = faiss.try_extract_index_ivf(index)
                if ivf is not None and ivf.nlist > SORT_GROUPS:
                    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
                    km = faiss.Kmeans(dim, SORT_GROUPS, niter=20, spherical=True, seed=config.seed,
                                      min_points_per_centroid=1)
                    km.train(centroids)
                    self._sorter = km.index
                    break

    def describe(self) -> dict[str, Any]:
        return {"positives": self.pos_info, "negatives": self.neg_info, "k": self.config.k,
                "sorted_queries": self._sorter is not None}

    def neighbours(self, vectors: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((similarities, ids) of the k nearest positives, (similarities, ids) of the k nearest negatives) of these
        vectors, in their order; ids are reference rows in the order they were given."""
        from cytoretrieve.store.index import l2_normalise

        q = l2_normalise(vectors)
        return self.pos.search(q, self.k_pos), self.neg.search(q, self.k_neg)

    def _batch_scores(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Tile scores of the rows of `parts` (one batch, concatenated), searched in sorter order, SEARCH_SLICE
        queries per FAISS call. The batch is gathered once, already in that order, and normalised in place."""
        sizes = [len(p) for p in parts]
        n = int(sum(sizes))
        dim = int(np.asarray(parts[0]).shape[1])
        q = np.empty((n, dim), dtype=np.float32)
        order = None
        if self._sorter is not None and n > 1:
            # the nearest centre by inner product is the same for a vector and its unit vector: raw rows will do
            group = np.concatenate([self._sorter.search(np.ascontiguousarray(p, dtype=np.float32), 1)[1][:, 0]
                                    for p in parts if len(p)])
            order = np.argsort(group, kind="stable")
            bounds = np.r_[0, np.cumsum(sizes)]
            part_of = np.searchsorted(bounds, order, side="right") - 1
            for j, p in enumerate(parts):
                at = np.flatnonzero(part_of == j)
                if len(at):
                    q[at] = np.asarray(p)[order[at] - bounds[j]]
        else:
            a = 0
            for p in parts:
                q[a:a + len(p)] = p
                a += len(p)
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q /= np.where(norms > 0, norms, 1)
        s = np.empty(n, dtype=np.float32)
        for a in range(0, n, SEARCH_SLICE):
            qa = q[a:a + SEARCH_SLICE]
            sp, ip = self.pos.search(qa, self.k_pos)
            sn, i_n = self.neg.search(qa, self.k_neg)
            s[a:a + len(qa)] = _mean_hits(sp, ip) - _mean_hits(sn, i_n)
        if order is None:
            return s
        out = np.empty_like(s)
        out[order] = s
        return out

    def tile_scores(self, vectors: np.ndarray) -> np.ndarray:
        """Tile scores of one bag (or any rows), in `query_batch` batches."""
        b = self.config.query_batch
        parts = [self._batch_scores([vectors[a:a + b]]) for a in range(0, len(vectors), b)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def predict(self, vectors: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(slide scores, tile scores per slide). Bags are read once each, in order, and searched `query_batch`
        tiles at a time across bag boundaries."""
        tiles: list[np.ndarray] = [np.zeros(0, np.float32)] * len(vectors)
        held: list[tuple[int, np.ndarray]] = []
        rows = 0

        def flush() -> None:
            if not held:
                return
            s = self._batch_scores([v for _, v in held])
            a = 0
            for i, v in held:
                tiles[i] = s[a:a + len(v)]
                a += len(v)
            held.clear()

        for i in range(len(vectors)):
            v = np.asarray(vectors[i])
            if len(v) > self.config.query_batch:
                flush()
                rows = 0
                tiles[i] = self.tile_scores(v)
                continue
            if rows + len(v) > self.config.query_batch:
                flush()
                rows = 0
            held.append((i, v))
            rows += len(v)
        flush()
        return np.array([slide_score(t, self.config.top_m) for t in tiles]), tiles


def fit_retrieval(bags: Bags, positives: np.ndarray | None = None, config: RetrievalConfig | None = None) -> RetrievalScorer:
    """Index the references of the training `bags` (and the annotated `positives`, when given)."""
    cfg = config or RetrievalConfig()
    y = np.asarray(bags.y)
    neg_i, pos_i = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    if not len(neg_i):
        raise CytoError("the retrieval method needs negative training slides (their tiles are the negative references)")
    negatives = bags.subset(neg_i).vectors
    if positives is None or len(positives) == 0:
        if not len(pos_i):
            raise CytoError("the retrieval method needs positive training slides or annotated positives")
        ref_pos: np.ndarray | Sequence[np.ndarray] = bags.subset(pos_i).vectors
    else:
        ref_pos = np.asarray(positives, dtype=np.float32)
    return RetrievalScorer(ref_pos, negatives, cfg)
