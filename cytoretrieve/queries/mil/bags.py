"""Bags of vectors: one bag per group (slide, patient, MIL-benchmark bag) of a vector table, labelled by a group-label
file (the slide labels CSV: `slide,label,binary`).

`load_bags` reads ids and groups first, then either copies the labelled groups' vectors into one array in a
streamed pass (when they fit in memory: never a copy of the whole table first) or leaves them in the table as
`StoredVectors`, read bag by bag by row id when a training batch or an inference pass needs them.

MIL benchmark files (Musk1/2, Fox, Tiger, Elephant, UCSB breast): `read_npz` (X, bag_offsets, bag_name, y_bag)
and `read_prtools_mat` (the miproblems.org PRTools dataset object: data, nlab, ident.milbag) give `Bags`;
`bags_to_table` writes them into a store table (group = slide = bag name) and `write_group_labels` the matching
labels CSV, so the benchmarks go through the same code path as slides.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cohort.labels import SlideLabel, read_labels

if TYPE_CHECKING:
    from cytoretrieve.sources.cohort.split import Split
    from cytoretrieve.store.tables import Store, VectorTable


@dataclass
class Bags:
    """Labelled bags: `vectors[i]` is bag i's (n_i, dim) instances, `y[i]` its binary label (1 positive)."""

    names: list[str]
    y: np.ndarray
    vectors: Sequence[np.ndarray]  # a list of arrays, or `StoredVectors` read from the table on access
    ids: list[list[str]] | None = None  # instance (tile) ids per bag, when read from a table
    unlabelled_groups: int = 0  # groups in the table without a (binary) label: ignored
    unlabelled_rows: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        if isinstance(self.vectors, StoredVectors):
            return self.vectors.table.dim
        return int(self.vectors[0].shape[1]) if len(self.vectors) else 0

    @property
    def instances(self) -> int:
        if isinstance(self.vectors, StoredVectors):
            return int(sum(self.vectors.sizes()))
        return int(sum(len(v) for v in self.vectors))

    def subset(self, index: Sequence[int] | np.ndarray) -> Bags:
        index = [int(i) for i in index]
        vectors = self.vectors
        return Bags(
            names=[self.names[i] for i in index], y=self.y[index],
            vectors=vectors.subset(index) if isinstance(vectors, StoredVectors) else [vectors[i] for i in index],
            ids=[self.ids[i] for i in index] if self.ids is not None else None,
        )

    def index_of(self, names: Sequence[str]) -> np.ndarray:
        pos = {n: i for i, n in enumerate(self.names)}
        return np.array([pos[n] for n in names], dtype=np.int64)


# ------------------------------------------------------------------------------------------------ from a table


def binary_labels(labels: dict[str, SlideLabel] | str | Path) -> tuple[dict[str, int], list[str]]:
    """{group: 0/1} from a labels CSV (or its parsed dict), and the groups left out because `binary` is empty."""
    if not isinstance(labels, dict):
        labels = read_labels(labels)
    known = {s: int(lab.binary) for s, lab in labels.items() if lab.binary is not None}
    unknown = sorted(s for s, lab in labels.items() if lab.binary is None)
    if not known:
        raise CytoError("the labels file gives no slide a binary label: add a binary column (1 positive, 0 negative)")
    if len(set(known.values())) < 2:
        raise CytoError(f"every labelled slide is {'positive' if next(iter(known.values())) else 'negative'}: "
                        "scoring needs positive and negative slides")
    return known, unknown


def _group_column(table: VectorTable, group_column: str) -> str:
    names = table.columns
    if group_column not in names:
        raise CytoError(f"table '{table.name}' has no column '{group_column}' (columns: {', '.join(names)})")
    return group_column


MEMORY_FRACTION = 0.5  # bags are held in memory when their vectors take at most this share of available RAM


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable; the physical total where that is unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class StoredVectors(Sequence[np.ndarray]):
    """Bags whose vectors stay in the table: `[i]` reads bag i's rows by row id (one LanceDB take, ~50 ms for
    5,000 x 384) each time it is accessed. What `load_bags` gives when the labelled vectors do not fit in memory:
    a training epoch or an inference pass then holds one mini-batch of bags at a time.

    Row ids address the table version that was read; keep the table unchanged (no `optimize`) while scoring.
    """

    def __init__(self, table: VectorTable, row_ids: list[np.ndarray], dtype: Any = np.float32) -> None:
        self.table, self.row_ids, self.dtype = table, row_ids, dtype

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, i: int | slice) -> Any:  # noqa: ANN401 - an array for an int, a list for a slice
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.table.take_vectors(self.row_ids[i]).astype(self.dtype, copy=False)

    def subset(self, index: Sequence[int]) -> StoredVectors:
        return StoredVectors(self.table, [self.row_ids[int(i)] for i in index], self.dtype)

    def sizes(self) -> list[int]:
        """Rows of each bag, without reading any."""
        return [len(r) for r in self.row_ids]


def load_bags(table: VectorTable, labels: dict[str, SlideLabel] | str | Path, *, group_column: str = "slide",
              dtype: Any = np.float32, stream: bool | None = None, where: str | None = None) -> Bags:
    """The bags of a vector table, one per labelled group (of the rows matching the SQL `where`, when given).

    A first pass reads only ids and groups. Then, when the labelled vectors fit (`stream` None: at most
    MEMORY_FRACTION of the available memory; False: always), one streamed pass copies them into a single array
    (one view per bag, no second copy); otherwise (`stream` True, or too large) the bags stay in the table as
    `StoredVectors`. Instances are in row-id order within a bag. Labels naming groups without rows are a
    `CytoError` (listed); rows of groups without a binary label are ignored and counted.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted, no_binary = binary_labels(labels)
    col = _group_column(table, group_column)
    dim = table.dim
    from cytoretrieve.store.tables import require_unique

    meta = table.scan(["id", col], where, row_id=True).read_all()  # rows `where` leaves out join no bag
    require_unique(table.name, meta.column("id"))
    groups = pc.dictionary_encode(meta.column(col).combine_chunks())
    names_in_table = [str(g) for g in groups.dictionary.to_pylist()]
    codes = pc.fill_null(groups.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)  # -1: no group
    names = sorted(g for g in set(names_in_table) if g in wanted)
    missing = sorted(set(wanted) - set(names))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        matching = f" matching `where` {where!r}" if where else ""
        raise CytoError(f"the labels name {len(missing)} slide(s) without rows{matching} in table '{table.name}' "
                        f"(column '{col}'): {shown}")
    position = {g: i for i, g in enumerate(names)}
    bag_of_code = np.array([position.get(g, -1) for g in names_in_table] + [-1], dtype=np.int64)
    bag = bag_of_code[codes]  # code -1 picks the trailing -1
    labelled = bag >= 0
    unlabelled_rows = int((~labelled).sum())
    unlabelled_groups = len(set(names_in_table) - set(names)) + int((codes < 0).any())
    row_id = meta.column("_rowid").to_numpy()
    rows = np.flatnonzero(labelled)
    rows = rows[np.lexsort((row_id[rows], bag[rows]))]  # bag by bag, row-id order within a bag
    bounds = np.r_[0, np.cumsum(np.bincount(bag[rows], minlength=len(names)))]
    all_ids = meta.column("id").take(pa.array(rows)).to_pylist()
    ids = [all_ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    bag_rid = row_id[rows]  # the row ids of the labelled rows, bag by bag
    nbytes = len(rows) * dim * np.dtype(dtype).itemsize
    if stream is None:
        stream = nbytes > MEMORY_FRACTION * available_memory()
    notes = []
    if stream:
        vectors: Sequence[np.ndarray] = StoredVectors(
            table, [bag_rid[a:b] for a, b in zip(bounds[:-1], bounds[1:])], dtype)
        notes.append(f"bags streamed from the table ({nbytes / 2**30:.1f} GiB of vectors left on disk)")
    else:
        x = np.empty((len(rows), dim), dtype=dtype)
        by_rid = np.argsort(bag_rid, kind="stable")  # where each row id, in ascending order, goes in x
        sorted_rid = bag_rid[by_rid]
        for batch in table.scan(["vector"], row_id=True):
            rid = batch.column("_rowid").to_numpy()
            pos = np.minimum(np.searchsorted(sorted_rid, rid), max(len(sorted_rid) - 1, 0))
            hit = sorted_rid[pos] == rid if len(sorted_rid) else np.zeros(len(rid), bool)
            if hit.any():
                vec = batch.column("vector")
                xb = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), dim)
                x[by_rid[pos[hit]]] = xb[hit]
        pa.default_memory_pool().release_unused()  # the scan's buffers (~0.1 GiB at 1.5M x 384)
        vectors = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if unlabelled_rows:
        notes.append(f"{unlabelled_rows} rows of {unlabelled_groups} unlabelled group(s) ignored")
    if no_binary:
        notes.append(f"{len(no_binary)} labelled slide(s) without a binary label left out")
    return Bags(
        names=names, y=np.array([wanted[g] for g in names], dtype=np.int8), vectors=vectors, ids=ids,
        unlabelled_groups=unlabelled_groups, unlabelled_rows=unlabelled_rows, notes=notes,
    )


@dataclass
class Positives:
    """Annotated positive instances (cell or tile vectors, binary = 1) and the slide each came from (None when
    unknown): the retrieval method's positive references and the cells of positive-bag augmentation. Slides are
    kept so a fold never uses the annotated cells of its own validation or test slides."""

    vectors: np.ndarray
    slides: list[str | None]

    def __len__(self) -> int:
        return len(self.vectors)

    def excluding(self, slides: set[str]) -> Positives:
        keep = np.array([s not in slides for s in self.slides], dtype=bool)
        return Positives(self.vectors[keep], [s for s, k in zip(self.slides, keep) if k])


def load_positives(table: VectorTable, labels: str = "stored") -> Positives:
    """The binary = 1 rows of an annotation (or any) vector table, with their slide (else group) column; `labels`:
    the stored or the reviewed binary labels (`queries.labels`)."""
    if labels == "stored":
        x, meta = table.vectors(["slide", "group"], where="binary = 1")
    else:
        from cytoretrieve.queries.labels import labelled_vectors

        x, meta, _ = labelled_vectors(table, ["slide", "group", "binary"], labels)
        keep = np.array([b == 1 for b in meta.column("binary").to_pylist()], dtype=bool)
        x, meta = x[keep], meta.filter(keep)
    if not len(x):
        raise CytoError(f"table '{table.name}' has no positive rows (binary = 1)")
    slides = [s if s is not None else g for s, g in zip(meta.column("slide").to_pylist(), meta.column("group").to_pylist())]
    return Positives(x, slides)


def check_split(bags: Bags, split: Split) -> None:
    """Every labelled bag must be in the split file; otherwise a `CytoError` listing the slides it lacks."""
    missing = sorted(set(bags.names) - set(split.fold_of))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise CytoError(f"the split file does not cover {len(missing)} labelled slide(s): {shown} "
                        "(make it from the same labels with `cytoretrieve split`)")


# ------------------------------------------------------------------------------------------ MIL benchmark files


def bags_to_table(store: Store, name: str, bags: Bags, *, dataset: str | None = None) -> VectorTable:
    """Write bags into a vector table: one row per instance, `group` = `slide` = bag name, `binary` = bag label.

    The "backbone" recorded is the benchmark file itself (arch `mil-benchmark`, fingerprint = hash of the data),
    so the table refuses to be mixed with another benchmark's instances. Rewriting the same bags adds nothing.
    """
    digest = hashlib.sha256()
    for v in bags.vectors:
        digest.update(np.ascontiguousarray(v, dtype=np.float32).tobytes())
    digest.update("\n".join(bags.names).encode())
    backbone = {"arch": "mil-benchmark", "fingerprint": digest.hexdigest(), "dim": bags.dim}
    table = store.create_or_open(name, backbone, {"name": dataset or name, "kind": "mil-benchmark"})
    if table.count():
        return table
    records = []
    for b, (bag, v) in enumerate(zip(bags.names, bags.vectors)):
        for i in range(len(v)):
            records.append({"id": f"{bag}#{i}", "dataset": dataset or name, "label": str(int(bags.y[b])),
                            "binary": int(bags.y[b]), "group": bag, "slide": bag})
    table.add(table.make_rows(records, np.concatenate(bags.vectors)))
    table.finish()
    return table


def write_group_labels(bags: Bags, path: str | Path) -> Path:
    """The labels CSV (`slide,label,binary`) of the bags: the group-label file `score` and `split` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "binary"])
        for n, y in zip(bags.names, bags.y):
            w.writerow([n, "positive" if y else "negative", int(y)])
    return path
