"""Bags of vectors: one bag per group (slide, patient, MIL-benchmark bag) of a vector table, labelled by a group-label
file (the slide labels CSV: `slide,label,binary`).

`load_bags` streams the table in batches (`CellTable.scan`) and keeps only the vectors of labelled groups, so the
memory held is that of the labelled bags (optionally as float16), never a copy of the whole table first.
`iter_group_vectors` yields one group at a time (one filtered query per group) for inference over stores too
large to hold.

MIL benchmark files (Musk1/2, Fox, Tiger, Elephant, UCSB breast): `read_npz` (X, bag_offsets, bag_name, y_bag)
and `read_prtools_mat` (the miproblems.org PRTools dataset object: data, nlab, ident.milbag) give `Bags`;
`bags_to_table` writes them into a store table (group = slide = bag name) and `write_group_labels` the matching
labels CSV, so the benchmarks go through the same code path as slides.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.slides.labels import SlideLabel, read_labels

if TYPE_CHECKING:
    from cytoretrieve.slides.split import Split
    from cytoretrieve.store import CellTable, Store


@dataclass
class Bags:
    """Labelled bags: `vectors[i]` is bag i's (n_i, dim) instances, `y[i]` its binary label (1 positive)."""

    names: list[str]
    y: np.ndarray
    vectors: list[np.ndarray]
    ids: list[list[str]] | None = None  # instance (tile) ids per bag, when read from a table
    unlabelled_groups: int = 0  # groups in the table without a (binary) label: ignored
    unlabelled_rows: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.vectors[0].shape[1]) if self.vectors else 0

    @property
    def instances(self) -> int:
        return int(sum(len(v) for v in self.vectors))

    def subset(self, index: Sequence[int] | np.ndarray) -> Bags:
        index = [int(i) for i in index]
        return Bags(
            names=[self.names[i] for i in index], y=self.y[index],
            vectors=[self.vectors[i] for i in index],
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


def _group_column(table: CellTable, group_column: str) -> str:
    names = table.tbl.schema.names
    if group_column not in names:
        raise CytoError(f"table '{table.name}' has no column '{group_column}' (columns: {', '.join(names)})")
    return group_column


def load_bags(table: CellTable, labels: dict[str, SlideLabel] | str | Path, *, group_column: str = "slide",
              dtype: Any = np.float32) -> Bags:
    """The bags of a vector table, one per labelled group, streamed in batches.

    Labels naming groups without rows are a `CytoError` (listed); rows of groups without a binary label are
    ignored and counted (`unlabelled_rows`, `unlabelled_groups`). Instances keep the table's order within a group.
    """
    wanted, no_binary = binary_labels(labels)
    col = _group_column(table, group_column)
    dim = table.dim
    parts: dict[str, list[np.ndarray]] = {}
    id_parts: dict[str, list[list[str]]] = {}
    unlabelled_groups: set[str] = set()
    unlabelled_rows = 0
    for batch in table.scan(["id", col, "vector"]):
        groups = np.asarray(batch.column(col).to_pylist(), dtype=object)
        vec = batch.column("vector")
        x = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), dim)
        ids = np.asarray(batch.column("id").to_pylist(), dtype=object)
        order = np.argsort(groups.astype(str), kind="stable")
        sorted_groups = groups[order].astype(str)
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for a, b in zip(starts, ends):
            g = sorted_groups[a]
            rows = order[a:b]
            if g not in wanted:
                unlabelled_groups.add(g)
                unlabelled_rows += len(rows)
                continue
            parts.setdefault(g, []).append(x[rows].astype(dtype, copy=True))
            id_parts.setdefault(g, []).append(list(ids[rows]))
    missing = sorted(set(wanted) - set(parts))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise CytoError(f"the labels name {len(missing)} slide(s) without rows in table '{table.name}' "
                        f"(column '{col}'): {shown}")
    names = sorted(parts)
    notes = []
    if unlabelled_rows:
        notes.append(f"{unlabelled_rows} rows of {len(unlabelled_groups)} unlabelled group(s) ignored")
    if no_binary:
        notes.append(f"{len(no_binary)} labelled slide(s) without a binary label left out")
    return Bags(
        names=names, y=np.array([wanted[g] for g in names], dtype=np.int8),
        vectors=[np.concatenate(parts[g]) for g in names],
        ids=[sum(id_parts[g], []) for g in names],
        unlabelled_groups=len(unlabelled_groups), unlabelled_rows=unlabelled_rows, notes=notes,
    )


def iter_group_vectors(table: CellTable, groups: Sequence[str], *, group_column: str = "slide"
                       ) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """(group, vectors, ids) one group at a time (one filtered scan each): bounded memory for inference."""
    col = _group_column(table, group_column)
    for g in groups:
        x, meta = table.vectors(["id"], where=f"{col} = '" + g.replace("'", "''") + "'")
        yield g, x, meta.column("id").to_pylist()


def check_split(bags: Bags, split: Split) -> None:
    """Every labelled bag must be in the split file; otherwise a `CytoError` listing the slides it lacks."""
    missing = sorted(set(bags.names) - set(split.fold_of))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise CytoError(f"the split file does not cover {len(missing)} labelled slide(s): {shown} "
                        "(make it from the same labels with `cytoretrieve split`)")


# ------------------------------------------------------------------------------------------ MIL benchmark files


def read_npz(path: str | Path) -> Bags:
    """A MIL benchmark in the staged .npz layout: X, bag_offsets (CSR), bag_name, y_bag."""
    path = Path(path)
    if not path.is_file():
        raise CytoError(f"no MIL benchmark file {path}")
    try:
        z = np.load(path, allow_pickle=False)
        x, off, names, y = z["X"], z["bag_offsets"], z["bag_name"], z["y_bag"]
    except (KeyError, ValueError, OSError) as e:
        raise CytoError(f"{path} is not a MIL benchmark .npz (X, bag_offsets, bag_name, y_bag): {e}") from None
    if len(off) != len(names) + 1 or len(y) != len(names) or off[-1] != len(x):
        raise CytoError(f"{path}: bag_offsets, bag_name and y_bag disagree")
    x = x.astype(np.float32)
    return Bags(names=[str(n) for n in names], y=(np.asarray(y) > 0).astype(np.int8),
                vectors=[x[a:b] for a, b in zip(off[:-1], off[1:])])


def read_prtools_mat(path: str | Path) -> Bags:
    """A MIL benchmark as a PRTools dataset object (miproblems.org .mat): `x.data`, `x.nlab` (1 negative,
    2 positive, per instance), `x.ident.milbag` (bag id per instance). Bags keep the order of first appearance."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise CytoError(f"no MIL benchmark file {path}")
    try:
        obj = scipy.io.loadmat(path)["x"][0, 0]
        data = np.asarray(obj["data"], dtype=np.float32)
        nlab = np.asarray(obj["nlab"]).ravel().astype(int)
        milbag = obj["ident"][0, 0]["milbag"]
    except Exception as e:  # noqa: BLE001 - any parse failure means "not this format"
        raise CytoError(f"{path} is not a PRTools MIL dataset (.mat with x.data, x.nlab, x.ident.milbag): {e}") from None
    if milbag.dtype.kind in "US":
        bag_of = [str(s).strip() for s in np.asarray(milbag).ravel()]
    else:
        bag_of = [str(int(v)) for v in np.asarray(milbag).ravel()]
    if len(bag_of) != len(data) or len(nlab) != len(data):
        raise CytoError(f"{path}: data, nlab and milbag have different lengths")
    order: dict[str, list[int]] = {}
    for i, b in enumerate(bag_of):
        order.setdefault(b, []).append(i)
    names = list(order)
    y = []
    for b in names:
        labs = set(nlab[order[b]].tolist())
        if len(labs) != 1:
            raise CytoError(f"{path}: bag {b} has instances with different labels")
        y.append(1 if labs.pop() == 2 else 0)
    return Bags(names=names, y=np.array(y, dtype=np.int8), vectors=[data[order[b]] for b in names])


def read_benchmark(path: str | Path) -> Bags:
    """`read_npz` or `read_prtools_mat` by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return read_npz(path)
    if suffix == ".mat":
        return read_prtools_mat(path)
    raise CytoError(f"{path}: a MIL benchmark file is .npz or .mat (PRTools), not {suffix or 'without suffix'}")


def bags_to_table(store: Store, name: str, bags: Bags, *, dataset: str | None = None) -> CellTable:
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
