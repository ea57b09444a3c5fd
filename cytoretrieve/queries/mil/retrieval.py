"""The training-free retrieval score of slides: no model is trained, only nearest-neighbour searches over the
stored tile vectors (cosine similarity: L2-normalised vectors, inner product).

For a fold, two reference sets are searched: positives (annotated positive cells / tiles, or else every tile of
the positive training slides: noisy, most tiles of a positive slide are normal) and negatives (every tile of the
negative training slides, all negative). Tile score = mean similarity to its `k` nearest positives - mean
similarity to its `k` nearest negatives; slide score = mean of its `top_m` highest tile scores.

Why it is built as it is: searching every reference tile of a cohort exactly takes hours, so a set larger than
`exact_max` is searched in summary. `RetrievalConfig.references` says how (`REFERENCES`):
- `centroids` (default): cluster means with their counts (q . mean = q's mean similarity to the cluster's
  members, so a side's term becomes the mean similarity to the members of q's best clusters, counted by their
  sizes until k). When both sets are large (`_summarised`), the positives the tile score itself flags as salient
  (`_salient_positives`: above a null of sampled negatives, sides swapped, sets sampled to equal density) keep
  small clusters of their own so that a rare abnormal pattern close to a normal one is not averaged away; every
  other reference goes to one k-means of both sides, so a normal tile meets the same cell on both sides and
  scores ~0; all means are searched in a shared low-rank basis. When one set is small (annotated positives), the
  other is summarised by its own k-means.
- `tiles`: every reference tile, in an approximate index (`index`: `ivfpq` above `exact_max` by default, IVF-PQ
  fast-scan codes re-ranked on float16 copies), queries grouped by IVF region so that consecutive queries re-rank
  neighbouring references while those are in the CPU cache (results do not depend on the grouping).

Every FAISS object (indexes, k-means) is built through `store/ann.py`; with faiss-gpu and a GPU, the k-means and
the centroid searches run on GPU 0. Tiles of several slides are scored together (`query_batch` rows); bags may
be arrays or any sequence that reads a bag on `[i]` (`bags.StoredVectors`), each read once per pass. Time,
memory and slide AUC of both modes at cohort scale (`benchmarks/mil_scale.py`): BENCHMARKS.md, "MIL scoring at
cohort scale".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil.bags import Bags

REFERENCES = ("centroids", "tiles")
INDEXES = ("auto", "flat", "ivf", "ivfpq")
SEARCH_SLICE = 16_384  # queries per FAISS call (IVF-PQ + refine holds refine x k candidates per query meanwhile)
SORT_GROUPS = 64  # query order: by the nearest of this many centres (k-means of the IVF centroids)
SAMPLE_PER_CENTROID = 64  # k-means training rows per cluster (FAISS warns below 39)
ASSIGN_SLICE = 65_536  # references assigned to their cluster per FAISS call
SALIENT_NULL = 20_000  # sampled negatives whose swapped tile scores are the null of a positive's own score
SALIENT_MEMBERS = 5  # salient positives per cluster: finer than k, so that a rare pattern keeps means of its own
SALIENT_RANK = 16  # basis dimensions added for the salient means' directions outside the cells' span
SALIENT_NPROBE, SALIENT_REFINE = 6, 6  # the salient screen's IVF-PQ searches: half the work of the tile defaults


@dataclass
class RetrievalConfig:
    k: int = 10
    top_m: int = 10
    references: str = "centroids"  # what a large reference set is searched as: centroids or tiles (REFERENCES)
    centroids: int = 256  # centroids: cells of the k-means of both sets (of each set larger than exact_max when one is small)
    rank: int = 64  # centroids: dimensions of the shared basis the means are searched in (0: the full dimension)
    salient_quantile: float = 0.9999  # centroids: positives whose own tile score exceeds this quantile of the null stay apart
    kmeans_iters: int = 20
    query_batch: int = 65_536  # tiles searched together (several slides' worth)
    index: str = "auto"  # tiles: auto (flat up to exact_max references, else ivfpq), flat, ivf, ivfpq
    exact_max: int = 50_000
    nlist: int = 0  # IVF lists; 0: the power of two nearest 2 sqrt(n), 16-4096
    nprobe: int = 12  # IVF lists visited per query
    refine: int = 12  # ivfpq: candidates re-ranked (exact, float16 copies) per neighbour wanted
    sort_queries: bool = True  # tiles: search grouped by IVF region (same results, faster)
    seed: int = 0  # of the training samples and k-means

    def to_dict(self) -> dict:
        return asdict(self)


def slide_score(tile_scores: np.ndarray, top_m: int) -> float:
    """Mean of the `top_m` highest tile scores."""
    s = np.sort(np.asarray(tile_scores, dtype=np.float64))[::-1]
    return float(s[: max(1, top_m)].mean()) if len(s) else float("nan")


def build_references(chunks: Sequence[np.ndarray], dim: int, config: RetrievalConfig) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product index of the L2-normalised rows of `chunks` (ids: rows in chunk order), and a
    description of it (kind, rows, nlist, nprobe, refine). The chunks are added in batches: no concatenated copy."""
    from cytoretrieve.store.ann import IndexParams, build_index, chunk_sizes

    n = int(sum(chunk_sizes(chunks)))
    if n == 0:
        raise CytoError("the retrieval method has an empty reference set")
    kind = config.index
    if kind not in INDEXES:
        raise CytoError(f"unknown retrieval index '{kind}' (one of {', '.join(INDEXES)})")
    if kind == "auto":
        kind = "flat" if n <= config.exact_max else "ivfpq"
    params = IndexParams(nlist=config.nlist, nprobe=config.nprobe, refine=config.refine, seed=config.seed)
    return build_index(chunks, kind, params)


def _kmeans(sample: np.ndarray, n_clusters: int, config: RetrievalConfig) -> Any:  # noqa: ANN401
    """A FAISS k-means of these (normalised) rows: an index that finds a row's nearest centroid."""
    from cytoretrieve.store.ann import gpu_available, kmeans

    return kmeans(sample, n_clusters, niter=config.kmeans_iters, seed=config.seed, gpu=gpu_available(),
                  max_points_per_centroid=SAMPLE_PER_CENTROID, min_points_per_centroid=1)


def _assign_means(chunks: Sequence[np.ndarray], quantizer: Any, dim: int,  # noqa: ANN401
                  left_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means, counts) of the cells of `quantizer` over the normalised rows of `chunks`, each row in the cell of its
    nearest centroid, each cell kept as the mean of its members (not the training sample's) and their count; empty
    cells are dropped. Rows flagged in `left_out` (chunk order) are not assigned: they come back, normalised, third."""
    from cytoretrieve.store.ann import chunk_sizes, l2_normalise

    sizes = chunk_sizes(chunks)
    sums = np.zeros((quantizer.ntotal, dim), np.float64)
    counts = np.zeros(quantizer.ntotal, np.int64)
    apart, start = [], 0
    for i in range(len(sizes)):
        c = np.asarray(chunks[i])
        for a in range(0, len(c), ASSIGN_SLICE):
            x = l2_normalise(c[a:a + ASSIGN_SLICE])
            if left_out is not None:
                out = left_out[start + a:start + a + len(x)]
                apart.append(x[out])
                x = x[~out]
            if not len(x):
                continue
            label = quantizer.search(x, 1)[1][:, 0]
            order = np.argsort(label, kind="stable")
            hit, first = np.unique(label[order], return_index=True)
            sums[hit] += np.add.reduceat(x[order], first, axis=0)
            counts[hit] += np.diff(np.r_[first, len(x)])
        start += sizes[i]
    kept = counts > 0
    rest = np.concatenate(apart) if apart else np.zeros((0, dim), np.float32)
    return (sums[kept] / counts[kept, None]).astype(np.float32), counts[kept], rest


def cluster_references(chunks: Sequence[np.ndarray], dim: int, config: RetrievalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(means, counts) of a k-means partition of the normalised rows of `chunks`: FAISS k-means trained on a sample,
    then one pass over every row assigning it to its nearest centroid (`_assign_means`)."""
    from cytoretrieve.store.ann import chunk_sizes, sample_rows

    sizes = chunk_sizes(chunks)
    n_clusters = max(1, min(config.centroids, int(sum(sizes))))
    quantizer = _kmeans(sample_rows(chunks, sizes, n_clusters * SAMPLE_PER_CENTROID, config.seed), n_clusters, config)
    return _assign_means(chunks, quantizer, dim)[:2]


def _leave_out_mean(index: Any, x: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:  # noqa: ANN401
    """Mean similarity of each row of `x` to its k nearest references in `index` other than reference `own` (the
    row itself); where the search does not return it, the (k+1)-th is dropped instead."""
    d, i = index.search(x, k + 1)
    keep = (i != own[:, None]) & (i >= 0)
    keep[keep.sum(1) > k, -1] = False
    return np.where(keep, d, 0).sum(1) / np.maximum(keep.sum(1), 1)


def _at_most(chunks: Sequence[np.ndarray], n: int, seed: int) -> tuple[Sequence[np.ndarray], np.ndarray]:
    """`n` rows of `chunks` drawn uniformly (all of them when they are no more), and each row's id among those drawn
    (-1: not drawn), in chunk order."""
    from cytoretrieve.store.ann import ChunkRows, chunk_sizes, draw_positions

    sizes = chunk_sizes(chunks)
    total = int(sum(sizes))
    if total <= n:
        return chunks, np.arange(total)
    keep = draw_positions(total, n, seed)
    ids = np.full(total, -1, np.int64)
    ids[keep] = np.arange(n)
    return ChunkRows(chunks, sizes, keep), ids


def _own_scores(own_side: Any, other_side: Any, x: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:  # noqa: ANN401
    """Tile scores of normalised rows `x` that belong to `own_side` (their ids in it: `own`, -1 where absent): mean
    similarity to their k nearest there, themselves left out, minus that to their k nearest of `other_side`."""
    return np.concatenate([_leave_out_mean(own_side, x[a:a + SEARCH_SLICE], own[a:a + SEARCH_SLICE], k)
                           - _mean_hits(*other_side.search(x[a:a + SEARCH_SLICE], k))
                           for a in range(0, len(x), SEARCH_SLICE)])


def _salient_positives(pos: Sequence[np.ndarray], neg: Sequence[np.ndarray], dim: int,
                       config: RetrievalConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Which positive references the tile method itself scores above chance (a mask in chunk order), and how many.

    Each positive reference gets its tile score against both sides' tile indexes (`build_references`, searched with
    `SALIENT_NPROBE` / `SALIENT_REFINE`: a screen, ~2x faster than the tile defaults), itself left out of the
    positives. The null is the same score for `SALIENT_NULL` sampled negatives with the sides swapped
    (nearest negatives, itself left out, minus nearest positives): a negative's nearest negatives include tiles of
    its own slide just as a positive's nearest positives do, so normal tiles of positive slides score like the null.
    That needs sides of equal density (a denser side scores its own tiles higher: with 5x more negatives the null
    sat above every positive), so the larger set is indexed through a uniform sample of the smaller one's size
    (`_at_most`). Salient = above the null's `salient_quantile`."""
    from dataclasses import replace

    from cytoretrieve.store.ann import chunk_sizes, l2_normalise, sample_positions

    screen = replace(config, nprobe=min(config.nprobe, SALIENT_NPROBE), refine=min(config.refine, SALIENT_REFINE))
    n = min(int(sum(chunk_sizes(pos))), int(sum(chunk_sizes(neg))))
    p_rows, p_ids = _at_most(pos, n, config.seed + 2)
    n_rows, _ = _at_most(neg, n, config.seed + 3)
    p_index, _ = build_references(p_rows, dim, screen)
    n_index, _ = build_references(n_rows, dim, screen)
    k = max(1, min(config.k, p_index.ntotal - 1, n_index.ntotal - 1))
    scores, start = [], 0
    for i in range(len(chunk_sizes(pos))):
        c = np.asarray(pos[i])
        for a in range(0, len(c), SEARCH_SLICE):  # normalised a slice at a time: no normalised copy of a big chunk
            x = l2_normalise(c[a:a + SEARCH_SLICE])
            scores.append(_own_scores(p_index, n_index, x, p_ids[start + a:start + a + len(x)], k))
        start += len(c)
    x, own = sample_positions(n_rows, chunk_sizes(n_rows), SALIENT_NULL, config.seed + 1)  # own: ids in n_index
    null = _own_scores(n_index, p_index, x, own, k)
    threshold = float(np.quantile(null, config.salient_quantile))
    salient = np.concatenate(scores) > threshold
    return salient, {"salient": int(salient.sum()), "threshold": threshold, "null_rows": len(null),
                     "screen_rows": n}


def _summarised(pos: Sequence[np.ndarray], neg: Sequence[np.ndarray], dim: int,
                config: RetrievalConfig) -> tuple[_Side, _Side, np.ndarray | None]:
    """Both large sets as cluster means: the salient positives (`_salient_positives`) in clusters of about
    `SALIENT_MEMBERS` of their own, every other reference in the cells of one k-means of both sides (so that a
    normal tile meets the same cell on both sides, and its score is not the difference of two unrelated partitions);
    searched in a shared basis: the top `rank` right singular vectors of all the means, plus the top
    `SALIENT_RANK` of the salient means' remainder outside that span (a rare pattern's direction, which the cells'
    basis would drop)."""
    from cytoretrieve.store.ann import chunk_sizes, sample_rows

    salient, found = _salient_positives(pos, neg, dim, config)
    sizes = [int(sum(chunk_sizes(c))) for c in (pos, neg)]
    n_cells = max(1, min(config.centroids, sum(sizes)))
    sample = np.concatenate([sample_rows(c, chunk_sizes(c), -(-n_cells * SAMPLE_PER_CENTROID * n // sum(sizes)), config.seed)
                             for c, n in zip((pos, neg), sizes)])
    cells = _kmeans(sample, n_cells, config)
    p_means, p_counts, apart = _assign_means(pos, cells, dim, salient)
    n_means, n_counts, _ = _assign_means(neg, cells, dim)
    s_means = np.zeros((0, dim), np.float32)
    if len(apart):
        groups = max(1, min(config.centroids, len(apart) // SALIENT_MEMBERS))
        s_means, s_counts, _ = _assign_means([apart], _kmeans(apart, groups, config), dim)
        p_means, p_counts = np.concatenate([p_means, s_means]), np.concatenate([p_counts, s_counts])
    basis = None
    if 0 < config.rank < dim:
        stacked = np.concatenate([p_means, n_means]).astype(np.float64)
        basis = np.linalg.svd(stacked, full_matrices=False)[2][: config.rank].T
        if len(s_means) and SALIENT_RANK:
            rest = s_means - (s_means @ basis) @ basis.T
            basis = np.concatenate([basis, np.linalg.svd(rest, full_matrices=False)[2][:SALIENT_RANK].T], axis=1)
            basis = np.linalg.qr(basis)[0]
        basis = np.ascontiguousarray(basis, dtype=np.float32)
    sides = []
    for means, counts, side in ((p_means, p_counts, "positives"), (n_means, n_counts, "negatives")):
        rows = means if basis is None else means @ basis
        residual = 0.0 if basis is None else float(np.linalg.norm(means - rows @ basis.T) / np.linalg.norm(means))
        info = {"kind": "centroids", "rows": int(counts.sum()), "centroids": len(means), "smallest": int(counts.min()),
                "rank": int(rows.shape[1]), "residual": residual}
        if side == "positives":
            info.update(found, salient_centroids=len(s_means))
        sides.append(_flat_side(rows, counts, config.k, info))
    return sides[0], sides[1], basis


def _rows_needed(counts: np.ndarray, k: int) -> int:
    """The fewest rows whose counts always add up to k, whichever rows are nearest: those with the smallest counts."""
    return int(min(len(counts), np.searchsorted(np.cumsum(np.sort(counts)), k) + 1))


def _mean_hits(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean similarity of the neighbours found (FAISS pads missing ones with id -1)."""
    found = ids >= 0
    if found.all():
        return scores.mean(1)
    return np.where(found, scores, 0).sum(1) / np.maximum(found.sum(1), 1)


def _weighted_mean(scores: np.ndarray, ids: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """Mean similarity to the first k members of the clusters found, best cluster first (a cluster = `counts` copies
    of its mean)."""
    if scores.shape[1] == 1:  # _rows_needed: this one cluster holds >= k members
        return scores[:, 0]
    w = np.where(ids >= 0, counts[np.maximum(ids, 0)], 0).astype(np.float32)
    take = np.clip(k - (np.cumsum(w, 1) - w), 0, w)
    return (take * scores).sum(1) / np.maximum(take.sum(1), 1)


class _Side:
    """One reference set as searched: a FAISS inner-product index whose rows are tiles (`counts` None) or cluster
    means standing for `counts` tiles each; `mean_sims(q)` = the side's term of the tile score."""

    def __init__(self, index: Any, counts: np.ndarray | None, k: int, info: dict[str, Any]) -> None:  # noqa: ANN401
        self.index, self.counts, self.info = index, counts, info
        self.k = min(k, int(counts.sum()) if counts is not None else index.ntotal)
        self.rows = self.k if counts is None else _rows_needed(counts, self.k)

    def mean_sims(self, q: np.ndarray) -> np.ndarray:
        d, i = self.index.search(q, self.rows)
        return _mean_hits(d, i) if self.counts is None else _weighted_mean(d, i, self.counts, self.k)


def _flat_side(rows: np.ndarray, counts: np.ndarray, k: int, info: dict[str, Any]) -> _Side:
    from cytoretrieve.store.ann import flat_index, to_gpu

    return _Side(to_gpu(flat_index(rows), "flat"), counts, k, info)


def _sides(pos: Sequence[np.ndarray], neg: Sequence[np.ndarray], dim: int,
           config: RetrievalConfig) -> tuple[_Side, _Side, np.ndarray | None]:
    """Both sides as `config.references` says, and the basis (dim x rank) queries are projected on (None: none)."""
    from cytoretrieve.store.ann import chunk_sizes

    if config.references not in REFERENCES:
        raise CytoError(f"unknown retrieval references '{config.references}' (one of {', '.join(REFERENCES)})")
    if config.references == "tiles" or config.centroids < 1:
        return _tiles(pos, dim, config), _tiles(neg, dim, config), None
    large = [int(sum(chunk_sizes(c))) > config.exact_max for c in (pos, neg)]
    if not all(large):  # a small set as it is, exactly; the other summarised, searched in full dimension
        sides = [_flat_side(*cluster_references(c, dim, config), config.k,
                            {"kind": "centroids", "rows": int(sum(chunk_sizes(c)))})
                 if big else _tiles(c, dim, config) for c, big in zip((pos, neg), large)]
        return sides[0], sides[1], None
    return _summarised(pos, neg, dim, config)


def _tiles(chunks: Sequence[np.ndarray], dim: int, config: RetrievalConfig) -> _Side:
    index, info = build_references(chunks, dim, config)
    return _Side(index, None, config.k, info)


def _as_chunks(x: np.ndarray | Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    return [x] if isinstance(x, np.ndarray) else x


class RetrievalScorer:
    """The two sides (positive, negative references); `predict(bags)` -> (slide scores, tile scores per slide)."""

    def __init__(self, positives: np.ndarray | Sequence[np.ndarray], negatives: np.ndarray | Sequence[np.ndarray],
                 config: RetrievalConfig) -> None:
        self.config = config
        pos, neg = _as_chunks(positives), _as_chunks(negatives)
        dim = next(int(np.asarray(c).shape[1]) for c in (pos[0], neg[0]))
        self.pos, self.neg, self.basis = _sides(pos, neg, dim, config)
        self._sorter = self._query_sorter() if config.sort_queries else None
        self._flat = all(side.info["kind"] in ("flat", "centroids") for side in (self.pos, self.neg))

    def _query_sorter(self) -> Any:  # noqa: ANN401
        """An index of SORT_GROUPS centres (a k-means of an IVF side's list centroids) that orders the queries, or
        None when no side is an IVF index."""
        from cytoretrieve.store.ann import ivf_centroids, kmeans

        for side in (self.pos, self.neg):
            centroids = ivf_centroids(side.index) if side.counts is None else None
            if centroids is not None and len(centroids) > SORT_GROUPS:
                return kmeans(centroids, SORT_GROUPS, niter=20, spherical=True, seed=self.config.seed,
                              min_points_per_centroid=1)
        return None

    def describe(self) -> dict[str, Any]:
        return {"positives": self.pos.info, "negatives": self.neg.info, "k": self.config.k,
                "references": self.config.references, "sorted_queries": self._sorter is not None}

    def neighbours(self, vectors: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((similarities, ids) of the k nearest positives, (similarities, ids) of the k nearest negatives) of these
        vectors, in their order; ids are reference rows in the order they were given (sides of tiles only)."""
        from cytoretrieve.store.ann import l2_normalise

        if self.pos.counts is not None or self.neg.counts is not None:
            raise CytoError("neighbours are reference tiles only with references = 'tiles'")
        q = l2_normalise(vectors)
        return self.pos.index.search(q, self.pos.k), self.neg.index.search(q, self.neg.k)

    def _gather(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows of `parts` in one float32 array, in sorter order when there is a sorter, and that order."""
        sizes = [len(p) for p in parts]
        n = int(sum(sizes))
        q = np.empty((n, int(np.asarray(parts[0]).shape[1])), dtype=np.float32)
        if self._sorter is None or n < 2:
            np.concatenate([np.asarray(p, dtype=np.float32) for p in parts], out=q)
            return q, None
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
        return q, order

    def _flat_batch_scores(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """`_batch_scores` when every side is a flat index: an exact inner-product search ranks a vector and its unit
        vector alike and the sides' terms are linear in the query, so the raw rows are searched (projected on the
        basis, if any, bag by bag) and the scores divided by the rows' norms: no normalised copy of the batch."""
        rows, norms = [], []
        for p in parts:
            p = np.ascontiguousarray(p, dtype=np.float32)
            rows.append(p if self.basis is None else p @ self.basis)
            norms.append(np.sqrt(np.einsum("ij,ij->i", p, p)))
        q, n = np.concatenate(rows), np.concatenate(norms)
        s = np.empty(len(q), dtype=np.float32)
        for a in range(0, len(q), SEARCH_SLICE):
            qa = q[a:a + SEARCH_SLICE]
            s[a:a + len(qa)] = self.pos.mean_sims(qa) - self.neg.mean_sims(qa)
        return s / np.where(n > 0, n, 1)

    def _batch_scores(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Tile scores of the rows of `parts` (one batch, concatenated), SEARCH_SLICE queries per FAISS call. The
        batch is gathered once (in sorter order, if any), normalised in place, projected on the basis if any."""
        if self._flat:
            return self._flat_batch_scores(parts)
        q, order = self._gather(parts)
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q /= np.where(norms > 0, norms, 1)
        s = np.empty(len(q), dtype=np.float32)
        for a in range(0, len(q), SEARCH_SLICE):
            qa = q[a:a + SEARCH_SLICE] if self.basis is None else q[a:a + SEARCH_SLICE] @ self.basis
            s[a:a + len(qa)] = self.pos.mean_sims(qa) - self.neg.mean_sims(qa)
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
