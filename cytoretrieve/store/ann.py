"""The package's index toolkit: index kinds as records, and what every index needs whatever it indexes.

Each kind (flat, ivf, ivfpq, hnsw, lance) is one `IndexKind` in `INDEX_KINDS`: its engine, its builder, its
filtered-search parameters, how it takes a table's keys, whether FAISS can remove its rows, when it is retrained,
whether it moves to a GPU, whether short searches run on one OpenMP thread, its bytes per row, and when `auto`
picks it. Everything kind-specific is read from the record, so adding a kind is one `register_index_kind` call
(and its test); `store/index.py` (a table's index cache), `queries/mil/retrieval.py` (reference sets) and `index
build --kind` only call this module. The FAISS kinds index any set of vectors; the `lance` kind is LanceDB's own
vector index inside a table (`store/lance_index.py`), the one engine that serves many machines from object storage
and tables whose FAISS index would not fit in memory.

Besides the kinds: L2 normalisation (the one place vectors get normalised: for references and queries alike, so
inner product = cosine similarity), exact neighbours, training samples drawn from chunked sets without
concatenating them, building an index in batches, k-means. faiss is imported inside the functions that use it,
so the command line can read the kinds' names and help without loading it. Measured figures behind the constants
are in BENCHMARKS.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.registry import Registry

if TYPE_CHECKING:
    import faiss

AUTO_FLAT_MAX = 100_000  # above this many rows `auto` builds an IVF index for a table
AUTO_COMPRESSED_VALUES = 1 << 29  # above rows x dim this many float32 values (2 GiB), `auto` builds `ivfpq`
HIGH_DIM = 1024  # from this dimension `ivfpq` re-ranks on 8-bit codes (1 byte / dimension), below on float16
EF_SEARCH = 128  # HNSW candidate list per query
NPROBE = 16  # IVF lists visited per query (recall on clustered embeddings: BENCHMARKS.md)
ADD_BATCH = 16_384  # rows normalised and added at once
TRAIN_PER_LIST = 64  # IVF k-means sample: this many rows per list (FAISS's default is 256)
KMEANS_ITERATIONS = 10
RETRAIN_GROWTH = 2.0  # an IVF table index is rebuilt (quantiser retrained) once the table has this x its rows
FEW_QUERIES = 8  # searches of up to this many queries run on one thread where the kind says so (`one_thread`)
IDS = ("native", "map", "map2")  # how a kind takes a table's keys (`IndexKind.ids`)
ENGINES = ("faiss", "lance")  # what serves a kind (`IndexKind.engine`)
OBJECT_STORES = ("s3", "s3+ddb", "gs", "az", "abfs", "abfss")  # URI schemes of object storage (`Where.remote`)
MEMORY_SHARE = 0.5  # `auto` leaves FAISS for `lance` when a FAISS index would take more than this x the RAM


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero): the one place vectors get normalised."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def auto_nlist(n: int) -> int:
    """IVF lists for `n` rows: the power of two nearest 2 sqrt(n), within 16-4096 and >= 39 rows per list."""
    nlist = 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(max(16, min(nlist, 4096)), n // 39)))


@dataclass(frozen=True)
class IndexParams:
    """Settings of the approximate kinds (ignored by `flat`)."""

    nlist: int = 0  # IVF lists; 0: auto_nlist(rows)
    nprobe: int = NPROBE
    refine: int = 12  # ivfpq: candidates re-ranked (exact, float16 copies) per neighbour wanted
    seed: int = 0  # of the IVF training sample and k-means
    niter: int = KMEANS_ITERATIONS  # k-means iterations of the IVF quantiser
    train_per_list: int = TRAIN_PER_LIST  # training rows per IVF list


Builder = Callable[[int, int, IndexParams], "faiss.Index"]
FilteredSearch = Callable[["faiss.Index", np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _plain_params(sel: faiss.IDSelector) -> faiss.SearchParameters:
    import faiss

    return faiss.SearchParameters(sel=sel)


def _always(rows: int, dim: int) -> bool:
    return True


@dataclass(frozen=True)
class Where:
    """Where a table's index would serve from: what `auto` weighs beside rows x dimension."""

    remote: bool = False  # the table lives on object storage (s3://, gs://, az://): many machines may read it
    memory: int | None = None  # bytes of RAM of this machine; None: unknown (every index is taken to fit)

    @classmethod
    def of(cls, uri: str) -> Where:
        """The placement of a store at `uri` on this machine (its RAM: `physical_memory`)."""
        return cls(remote=uri.split("://")[0].lower() in OBJECT_STORES if "://" in uri else False,
                   memory=physical_memory())


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the OS does not say). The total, not what is free now: a kind
    picked by the load of the moment would flip back and forth between searches."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class IndexKind:
    """One index kind: everything the package does differently for it.

    `build(dim, rows, params)` makes an empty, untrained inner-product index; a kind wants training when FAISS
    says so (`is_trained` False), on a sample of `params.train_per_list` rows per IVF list (at least 10,000).
    """

    name: str
    help: str  # a clause (no full stop), shown by `cytoretrieve index build --help`
    build: Builder
    # selector -> the faiss.SearchParameters of a search restricted to some keys (nprobe, efSearch, ...)
    search_params: Callable[[faiss.IDSelector], faiss.SearchParameters] = _plain_params
    # (index, queries, k, allowed keys) -> (scores, keys): replaces the selector search where FAISS does not pass a
    # selector down to the index that needs it (ivfpq: the re-ranking index around IVF-PQ)
    filtered_search: FilteredSearch | None = None
    # how it takes a table's keys: "native" (IVF: add_with_ids, plus a hashtable key map for `stored_vector`),
    # "map2" (an IndexIDMap2: looks vectors up by key, its map rebuilt on every load), "map" (a plain IndexIDMap:
    # no rehash on load; a key's row is found in the rows file)
    ids: str = "map2"
    removable: bool = True  # FAISS can remove its rows (else deleted rows make a table rebuild it)
    retrain_growth: float | None = None  # a table's index is rebuilt once the table has this x its trained rows
    gpu: bool = True  # moved to GPU 0 when faiss sees one
    one_thread: bool = False  # searches of up to FEW_QUERIES queries run on one OpenMP thread (`one_thread`)
    auto_priority: int | None = None  # `auto` tries the kinds by this, lowest first; None: never picked
    fits: Callable[[int, int], bool] = _always  # auto: this kind suits a table of (rows, dim)
    # auto: this kind suits a table of (rows, dim) served from `Where` (replaces `fits` where given)
    suits: Callable[[int, int, Where], bool] | None = None
    engine: str = "faiss"  # "faiss": an index cached beside the table (`store/index.py`); "lance": LanceDB's own
    bytes_per_row: Callable[[int], float] | None = None  # of dimension: the index's memory per row (sizing, auto)

    def __post_init__(self) -> None:
        if self.ids not in IDS:
            raise ValueError(f"index kind {self.name!r}: ids must be one of {IDS}, not {self.ids!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"index kind {self.name!r}: engine must be one of {ENGINES}, not {self.engine!r}")

    def suited(self, rows: int, dim: int, where: Where) -> bool:
        """`auto`'s test of this kind: `suits` where the kind has one, else `fits`."""
        return self.suits(rows, dim, where) if self.suits is not None else self.fits(rows, dim)


INDEX_KINDS: Registry[IndexKind] = Registry("index kind", also=("auto",))


def register_index_kind(kind: IndexKind) -> IndexKind:
    """Add (or replace) a kind: `build_index`, a table's index, `auto` and `index build --kind` see it (its help
    shows in `--help` when it is registered before the command line is imported)."""
    return INDEX_KINDS.add(kind.name, kind)


def index_kind(name: str) -> IndexKind:
    """The record of a kind; an unknown one is a user error."""
    return INDEX_KINDS.lookup(name)


def auto_kind(rows: int, dim: int, where: Where = Where()) -> str:
    """The kind `auto` builds for (rows, dim) served from `where`: the first kind by `auto_priority` that suits it
    (`lance` on object storage above `AUTO_FLAT_MAX` rows, or where a FAISS index would take more than
    `MEMORY_SHARE` of the RAM; else flat up to `AUTO_FLAT_MAX` rows, ivf up to `AUTO_COMPRESSED_VALUES` float32
    values, else ivfpq)."""
    ranked = sorted((k for k in INDEX_KINDS.values() if k.auto_priority is not None), key=lambda k: k.auto_priority)
    for kind in ranked:
        if kind.suited(rows, dim, where):
            return kind.name
    raise CytoError(f"no index kind suits {rows} rows of {dim} dimensions (auto tries {[k.name for k in ranked]})")


# -- the kinds ---------------------------------------------------------------------------------------------------


def _refine_codec(dim: int) -> str:
    """The re-ranking codes of `ivfpq`: float16 (exact to ~1e-4), 8-bit per dimension from `HIGH_DIM` dimensions
    (half the bytes)."""
    return "SQ8" if dim >= HIGH_DIM else "SQfp16"


def _pq_m(dim: int) -> int:
    """PQ sub-quantizers: 2 dimensions each (1 for an odd dimension). 4 dimensions each scan faster but need ~3x the
    re-ranked candidates for the same recall, which costs more than it saves."""
    return dim // 2 if dim % 2 == 0 else dim


def _pq8_m(dim: int) -> int:
    """8-bit PQ sub-quantizers of `ivfpq8`: 4 dimensions each (the largest divisor of `dim` up to dim / 4)."""
    return next(m for m in range(max(dim // 4, 1), 0, -1) if dim % m == 0)


def _flat(dim: int, n: int, p: IndexParams) -> faiss.Index:
    import faiss

    return faiss.IndexFlatIP(dim)


def _hnsw(dim: int, n: int, p: IndexParams) -> faiss.Index:
    import faiss

    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = EF_SEARCH
    return index


def _ivf_factory(spec: Callable[[int, int], str]) -> Builder:
    def make(dim: int, n: int, p: IndexParams) -> faiss.Index:
        import faiss

        nlist = min(p.nlist, max(1, n // 39)) if p.nlist else auto_nlist(n)
        index = faiss.index_factory(dim, spec(dim, nlist), faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = p.niter
        ivf.cp.max_points_per_centroid = p.train_per_list
        ivf.cp.seed = p.seed
        ivf.nprobe = min(p.nprobe, nlist)
        pq = faiss.downcast_index(ivf)
        if isinstance(pq, faiss.IndexIVFPQ):  # 8-bit PQ: no polysemous codes (their training is most of a build)
            pq.do_polysemous_training = False
        if isinstance(index, faiss.IndexRefine):
            index.k_factor = float(p.refine)
        return index

    return make


def _ivf_params(sel: faiss.IDSelector) -> faiss.SearchParameters:
    import faiss

    return faiss.SearchParametersIVF(sel=sel, nprobe=NPROBE)


def _hnsw_params(sel: faiss.IDSelector) -> faiss.SearchParameters:
    import faiss

    return faiss.SearchParametersHNSW(sel=sel, efSearch=EF_SEARCH)


def _search_refined(index: faiss.Index, queries: np.ndarray, k: int,
                    allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A filtered search of an id map around IVF-PQ + re-ranking: FAISS's id map translates a selector for the
    index it wraps, but the re-ranking index does not pass it on to its IVF, so the allowed keys are translated
    to row positions here and given to the IVF search directly."""
    import faiss

    keys = faiss.vector_to_array(index.id_map)
    positions = np.flatnonzero(np.isin(keys, np.asarray(allowed, dtype=np.int64))).astype(np.int64)
    refine = faiss.downcast_index(index.index)
    ivf = faiss.extract_index_ivf(refine)
    params = faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=faiss.SearchParametersIVF(
        sel=faiss.IDSelectorBatch(positions), nprobe=ivf.nprobe))
    scores, rows = refine.search(queries, k, params=params)
    return scores, np.where(rows >= 0, keys[np.maximum(rows, 0)], -1)


register_index_kind(IndexKind(
    "flat", f"exact search, auto's pick up to {AUTO_FLAT_MAX:,} rows", _flat,
    auto_priority=0, fits=lambda rows, dim: rows <= AUTO_FLAT_MAX, bytes_per_row=lambda dim: 4 * dim + 40))
register_index_kind(IndexKind(
    "ivf", f"IVFFlat, {NPROBE} lists visited per query, auto's pick up to 2^29 float32 values (rows x dimension)",
    _ivf_factory(lambda d, nlist: f"IVF{nlist},Flat"), search_params=_ivf_params, ids="native",
    retrain_growth=RETRAIN_GROWTH, one_thread=True,
    auto_priority=1, fits=lambda rows, dim: rows * dim <= AUTO_COMPRESSED_VALUES, bytes_per_row=lambda dim: 4 * dim + 40))
register_index_kind(IndexKind(
    "ivfpq", "IVF with 4-bit PQ fast-scan codes whose best candidates are re-ranked on float16 copies (8-bit from "
    f"{HIGH_DIM} dimensions), auto's pick above that, rebuilt when rows are deleted",
    _ivf_factory(lambda d, nlist: f"IVF{nlist},PQ{_pq_m(d)}x4fs,Refine({_refine_codec(d)})"),
    filtered_search=_search_refined, ids="map", removable=False, retrain_growth=RETRAIN_GROWTH, gpu=False,
    one_thread=True, auto_priority=2,
    bytes_per_row=lambda dim: _pq_m(dim) / 2 + (dim if dim >= HIGH_DIM else 2 * dim) + 8))
register_index_kind(IndexKind(
    "ivfpq8", "IVF with 8-bit PQ codes (not fast-scan), re-ranked as ivfpq: its whole cache file is memory-mapped, "
    "so a cold start reads only the lists its queries visit; never auto's pick, rebuilt when rows are deleted",
    _ivf_factory(lambda d, nlist: f"IVF{nlist},PQ{_pq8_m(d)},Refine({_refine_codec(d)})"),
    filtered_search=_search_refined, ids="map", removable=False, retrain_growth=RETRAIN_GROWTH, gpu=False,
    one_thread=True, bytes_per_row=lambda dim: _pq8_m(dim) + (dim if dim >= HIGH_DIM else 2 * dim) + 8))
register_index_kind(IndexKind(
    "hnsw", f"HNSW graph (32 links, efSearch {EF_SEARCH}) on the CPU, never auto's pick, rebuilt when rows are "
    "deleted", _hnsw, search_params=_hnsw_params, removable=False, gpu=False,
    bytes_per_row=lambda dim: 4 * dim + 8 + 64 * 4 * 1.1))


def faiss_bytes(rows: int, dim: int) -> float:
    """The memory of the FAISS index `auto` would build for (rows, dim) on a machine of unknown RAM."""
    kind = INDEX_KINDS[auto_kind(rows, dim)]
    return rows * (kind.bytes_per_row(dim) if kind.bytes_per_row is not None else 4 * dim)


def _lance_suits(rows: int, dim: int, where: Where) -> bool:
    """LanceDB's own index above `AUTO_FLAT_MAX` rows on object storage (built once in the store, shared by every
    machine, where each reader would otherwise build and hold a FAISS copy), or where the FAISS index would take
    more than `MEMORY_SHARE` of this machine's RAM."""
    if rows <= AUTO_FLAT_MAX:
        return False
    return where.remote or (where.memory is not None and faiss_bytes(rows, dim) > MEMORY_SHARE * where.memory)


def _no_faiss(dim: int, n: int, p: IndexParams) -> faiss.Index:
    raise CytoError("index kind 'lance' indexes a table inside its store (LanceDB's own index), not a set of "
                    "vectors: use a FAISS kind (flat, ivf, ivfpq, hnsw) here")


LANCE_HELP = ("LanceDB's own IVF-RQ index inside the table (re-ranked on the stored vectors; appended rows searched "
              "flat until folded in), shared by every machine that reads the store: auto's pick above "
              f"{AUTO_FLAT_MAX:,} rows on object storage, or where a FAISS index would take more than half the RAM")
register_index_kind(IndexKind(
    "lance", LANCE_HELP, _no_faiss, ids="native", gpu=False, engine="lance", auto_priority=-1, suits=_lance_suits,
    bytes_per_row=lambda dim: dim / 8 + 45))  # 1-bit codes + ids, factors, partitions (93 B at 384-d: measured)


# -- chunked sets and samples -------------------------------------------------------------------------------------


def chunk_sizes(chunks: Sequence[np.ndarray]) -> list[int]:
    """Rows of each chunk."""
    sizes = getattr(chunks, "sizes", None)  # a lazy sequence of bags tells its sizes without reading them
    return sizes() if callable(sizes) else [len(c) for c in chunks]


def sample_rows(chunks: Sequence[np.ndarray], sizes: list[int], n: int, seed: int) -> np.ndarray:
    """`n` L2-normalised rows drawn uniformly (without replacement) from the chunks, reading only chunks that hold
    one: a training sample (IVF quantisers here, k-means of retrieval references)."""
    return sample_positions(chunks, sizes, n, seed)[0]


def sample_positions(chunks: Sequence[np.ndarray], sizes: list[int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`sample_rows` and the rows' positions in chunk order (ascending)."""
    pick = draw_positions(sum(sizes), n, seed)
    rows = ChunkRows(chunks, sizes, pick)
    return l2_normalise(np.concatenate([rows[i] for i, m in enumerate(rows.sizes()) if m])), pick


def draw_positions(total: int, n: int, seed: int) -> np.ndarray:
    """`n` of the positions 0..total-1 (all when n >= total), drawn uniformly without replacement, ascending."""
    return np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))


class ChunkRows(Sequence):
    """The rows at positions `keep` (ascending, in chunk order) of a sequence of chunks, chunk by chunk: a sample of
    a reference set that is never one array (chunks may be bags read from the table on `[i]`)."""

    def __init__(self, chunks: Sequence[np.ndarray], sizes: list[int], keep: np.ndarray) -> None:
        bounds = np.r_[0, np.cumsum(sizes)]
        starts, ends = np.searchsorted(keep, bounds[:-1]), np.searchsorted(keep, bounds[1:])
        self.chunks, self.parts = chunks, [keep[a:b] - bounds[i] for i, (a, b) in enumerate(zip(starts, ends))]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        part = self.parts[i]  # first: an index past the end is an IndexError whatever the chunks are
        return np.asarray(self.chunks[i])[part]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self.parts)))

    def sizes(self) -> list[int]:
        return [len(p) for p in self.parts]


# -- building -----------------------------------------------------------------------------------------------------


def new_index(kind: str, dim: int, n: int, params: IndexParams) -> tuple[faiss.Index, dict[str, Any], int]:
    """An empty, untrained index of `kind` for `n` rows, its description, and the rows its training wants (0: no
    training). Unknown kinds and empty sets are user errors."""
    import faiss

    record = index_kind(kind)
    if n == 0:
        raise CytoError("cannot index an empty set of vectors")
    index = record.build(dim, n, params)
    info: dict[str, Any] = {"kind": kind, "rows": n}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        info.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
        if isinstance(index, faiss.IndexRefine):
            info["refine"] = params.refine
    if index.is_trained:
        return index, info, 0
    lists = int(ivf.nlist) if ivf is not None else 1
    return index, info, max(params.train_per_list * lists, 10_000)


@contextmanager
def one_thread(when: bool = True) -> Iterator[None]:
    """FAISS on one OpenMP thread (of the calling thread only: OpenMP keeps the count per thread) where its
    parallel regions are too short to pay: on a busy machine a waiting OpenMP thread spins for a core it does not
    get (short IVF-PQ searches and PQ training: BENCHMARKS.md, issue 13)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    if when:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def search_threads(kind: str, queries: int) -> AbstractContextManager[None]:
    """The threads a search of `queries` queries of `kind` runs on (`IndexKind.one_thread`)."""
    return one_thread(queries <= FEW_QUERIES and index_kind(kind).one_thread)


def train(index: faiss.Index, sample: np.ndarray) -> None:
    """Train on one thread (`one_thread`; the coarse k-means loses at most ~2x on an idle machine)."""
    with one_thread():
        index.train(sample)


def reserve(index: faiss.Index, n: int) -> None:
    """Allocate the re-ranking codes of an `IndexRefine` for `n` rows at once. Added batch by batch, FAISS grows
    that buffer (most of the index: 2 bytes a dimension) by doubling, and while it grows the old and the new
    buffers are both held: at 10M x 384 the build's peak memory was about twice the index. FAISS's Python API has
    no `reserve`; growing the vector to `n` rows and shrinking it back to none keeps the capacity."""
    import faiss

    if not isinstance(index, faiss.IndexRefine):
        return
    codes = faiss.downcast_index(index.refine_index)
    if isinstance(codes, faiss.IndexFlatCodes) and codes.ntotal == 0:
        codes.codes.resize(n * codes.code_size)
        codes.codes.resize(0)


def with_ids(kind: str, index: faiss.Index) -> faiss.Index:
    """`index` made to take a table's keys as ids, as its kind says (`IndexKind.ids`)."""
    import faiss

    ids = index_kind(kind).ids
    if ids == "native":
        return index
    return faiss.IndexIDMap(index) if ids == "map" else faiss.IndexIDMap2(index)


def with_key_map(index: faiss.Index) -> faiss.Index:
    """An IVF index that takes ids natively gets a key -> vector map, for `stored_vector` (one built or read back
    without it); id-mapped indexes are returned as they are."""
    import faiss

    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def add(index: faiss.Index, x: np.ndarray, ids: np.ndarray | None) -> None:
    """Add the L2-normalised rows of `x` in `ADD_BATCH` batches, with `ids` (int64) or none."""
    for b in range(0, len(x), ADD_BATCH):
        part = l2_normalise(np.asarray(x[b:b + ADD_BATCH]))
        if ids is None:
            index.add(part)
        else:
            index.add_with_ids(part, np.ascontiguousarray(ids[b:b + len(part)], dtype=np.int64))


def build_index(chunks: np.ndarray | Sequence[np.ndarray], kind: str, params: IndexParams = IndexParams(),
                ids: np.ndarray | None = None) -> tuple[faiss.Index, dict[str, Any]]:
    """An index of the L2-normalised rows of `chunks` (one array or a sequence of arrays, added in batches: no
    concatenated copy) and a description of it. Ids are `ids` (int64) or row positions in chunk order. IVF kinds
    train on a sample sized to their list count, not on every row."""
    chunks = [chunks] if isinstance(chunks, np.ndarray) else chunks
    sizes = chunk_sizes(chunks)
    n = int(sum(sizes))
    dim = int(np.asarray(chunks[next(i for i, s in enumerate(sizes) if s)]).shape[1]) if n else 0
    index, info, train_rows = new_index(kind, dim, n, params)
    if train_rows:
        train(index, sample_rows(chunks, sizes, train_rows, params.seed))
    reserve(index, n)
    if ids is not None:
        index = with_ids(kind, index)
    a = 0
    for c in chunks:
        add(index, c, None if ids is None else ids[a:a + len(c)])
        a += len(c)
    return (index if ids is None else with_key_map(index)), info


def flat_index(rows: np.ndarray) -> faiss.Index:
    """An exact inner-product index holding `rows` as they are (ids: row positions)."""
    import faiss

    index = faiss.IndexFlatIP(rows.shape[1])
    index.add(np.ascontiguousarray(rows, dtype=np.float32))
    return index


def exact_neighbours(references: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of already-normalised rows: (similarities, row indices), best first."""
    return flat_index(references).search(np.ascontiguousarray(queries, dtype=np.float32), k)


def kmeans(x: np.ndarray, clusters: int, **options: Any) -> faiss.Index:  # noqa: ANN401
    """A FAISS k-means (`faiss.Kmeans` options: niter, seed, spherical, gpu, max/min_points_per_centroid) of the
    rows of `x`; the returned index finds a row's nearest centroid."""
    import faiss

    km = faiss.Kmeans(int(x.shape[1]), clusters, **options)
    km.train(x)
    return km.index


def ivf_centroids(index: faiss.Index) -> np.ndarray | None:
    """The list centroids of an IVF index (or of the IVF inside it), None for other indexes."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else ivf.quantizer.reconstruct_n(0, ivf.nlist)


# -- a table's keys -----------------------------------------------------------------------------------------------


def mapped_ids(index: faiss.Index) -> np.ndarray | None:
    """The ids of an id-mapped index in row order (int64), None for one that holds ids itself (IVF)."""
    import faiss

    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    return None


def index_keys(index: faiss.Index) -> np.ndarray:
    """Every key an index holds (from its id map, or from an IVF index's inverted lists)."""
    import faiss

    ids = mapped_ids(index)
    if ids is not None:
        return ids
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(ivf.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def remove_keys(index: faiss.Index, keys: np.ndarray) -> None:
    """Remove the rows with these keys (the kind must be `removable`)."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.int64)
    index.remove_ids(faiss.IDSelectorArray(len(keys), faiss.swig_ptr(keys)))  # what a hashtable key map takes


def stored_vector(kind: str, index: faiss.Index, key: int,
                  row_of: Callable[[int], int | None]) -> np.ndarray | None:
    """The vector `index` stores under `key`, or None when it holds no such key or cannot look vectors up (a GPU
    copy). A kind whose ids sit in a plain IndexIDMap finds the key's row with `row_of` and reconstructs that row
    of the index inside (IVF-PQ + re-ranking: its re-ranking copy)."""
    import faiss

    if index_kind(kind).ids == "map" and isinstance(index, faiss.IndexIDMap):
        row = row_of(key)
        return None if row is None else faiss.downcast_index(index.index).reconstruct(row)
    try:
        return index.reconstruct(key)
    except (RuntimeError, TypeError):
        return None


# -- searching ----------------------------------------------------------------------------------------------------


def search(index: faiss.Index, kind: str, queries: np.ndarray, k: int,
           allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) of `queries` in an index of `kind`; `allowed` restricts hits to these ids."""
    if allowed is None:
        return index.search(queries, k)
    import faiss

    record = index_kind(kind)
    if record.filtered_search is not None:
        return record.filtered_search(index, queries, k, allowed)
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    return index.search(queries, k, params=record.search_params(sel))


def gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees a GPU (faiss-gpu imports fine without one)."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index | None, kind: str) -> faiss.Index | None:
    """`index` moved to GPU 0 when one is there and its kind moves (`IndexKind.gpu`: faiss has no GPU HNSW, nor a
    GPU copy of fast-scan codes inside a re-ranking index)."""
    if index is None or not index_kind(kind).gpu or not gpu_available():
        return index
    import faiss

    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
