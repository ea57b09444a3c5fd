"""Which labels a query uses, and the reviews themselves: the read side of the label log (`store/labels.py`).

`labels="stored"` (the default everywhere) is the label each row was embedded with; `labels="reviewed"` is the
row's current review where it has one (the latest expert or import event of the log), else its stored label. A
review of `unsure` leaves the row unlabelled (the reviewer doubts it); an undo back to no review falls back to the
stored label. `labelled_vectors` is the one place the queries (classify, transfer, score's positives, search
evaluation) get their label columns from, with a `LabelsUsed` they report. The next rows worth a review are
`queries/review_queue.py`'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cytoretrieve.errors import CytoError
from cytoretrieve.store.labels import UNSURE, latest_events, read_events

if TYPE_CHECKING:
    from cytoretrieve.store.tables import Store, VectorTable

LABEL_CHOICES = ("stored", "reviewed")


@dataclass
class LabelsUsed:
    """What a query used: `labels` (stored or reviewed), and of the table's rows how many carry a review, how many
    of those change the stored label, and how many a review of `unsure` left out."""

    labels: str = "stored"
    reviewed_rows: int = 0
    changed_rows: int = 0
    unsure_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, table: str) -> str:
        """One line for the CLI."""
        if self.labels == "stored":
            return f"{table}: stored labels ({self.reviewed_rows} row(s) carry a review, not used)"
        return (f"{table}: reviewed labels ({self.reviewed_rows} row(s) carry a review, {self.changed_rows} change "
                f"the stored label, {self.unsure_rows} unsure left out)")


def check_labels(labels: str) -> str:
    if labels not in LABEL_CHOICES:
        raise CytoError(f"`labels` must be stored or reviewed, not {labels!r}")
    return labels


def reviewed_count(store: Store, table: str) -> int:
    """Rows of `table` whose current review gives a label."""
    return sum(e.label is not None for e in latest_events(store, table).values())


def reviewed_columns(store: Store, table: str, ids: Sequence[str], label: Sequence[str | None],
                     binary: Sequence[int | None], labels: str = "stored"
                     ) -> tuple[list[str | None], list[int | None], LabelsUsed]:
    """The label and binary columns of these rows under `labels`, and what was used."""
    check_labels(labels)
    reviews = latest_events(store, table)
    used = LabelsUsed(labels)
    label, binary = list(label), list(binary)
    for i, row in enumerate(ids):
        event = reviews.get(row)
        if event is None or event.label is None:  # never reviewed, or undone back to no review
            continue
        used.reviewed_rows += 1
        used.unsure_rows += event.label == UNSURE
        used.changed_rows += event.label != label[i]
        if labels == "reviewed":
            label[i], binary[i] = (None, None) if event.label == UNSURE else (event.label, event.binary)
    return label, binary, used


def labelled_vectors(table: VectorTable, columns: Sequence[str], labels: str = "stored",
                     where: str | None = None) -> tuple[np.ndarray, pa.Table, LabelsUsed]:
    """`table.vectors(columns, where)` with its `label` / `binary` columns (those asked for) under `labels`."""
    check_labels(labels)
    want = list(dict.fromkeys(["id", *columns, "label", "binary"]))
    vectors, meta = table.vectors(want, where)
    label, binary, used = reviewed_columns(table.store, table.name, meta.column("id").to_pylist(),
                                           meta.column("label").to_pylist(), meta.column("binary").to_pylist(),
                                           labels)
    meta = meta.set_column(want.index("label"), "label", pa.array(label, pa.string()))
    meta = meta.set_column(want.index("binary"), "binary", pa.array(binary, pa.int8()))
    return vectors, meta.select(list(columns)), used


# ------------------------------------------------------------------------------------------------ the reviews


def current_reviews(table: VectorTable | Any, reviewer: str | None = None) -> list[dict[str, Any]]:  # noqa: ANN401
    """Every reviewed row of `table` (any store table with ids and labels): its current review with the stored
    label beside it and whether they disagree, latest first; only `reviewer`'s when given."""
    reviews = latest_events(table.store, table.name)
    rows = [e for e in reviews.values() if e.label is not None and (reviewer is None or e.reviewer == reviewer)]
    if not rows:
        return []
    from cytoretrieve.store.filters import one_of

    stored: dict[str, Any] = {}
    ids = sorted(e.row_id for e in rows)
    columns = [c for c in ("id", "label", "binary", "slide", "x", "y", "tile_size") if c in table.columns]
    for start in range(0, len(ids), 1000):
        part = table.read(columns, one_of("id", ids[start:start + 1000]))
        stored.update({r["id"]: r for r in part.to_pylist()})
    out = []
    for e in sorted(rows, key=lambda e: (e.time, e.event), reverse=True):
        s = stored.get(e.row_id, {})
        out.append({"id": e.row_id, **e.to_dict(), "stored_label": s.get("label"), "stored_binary": s.get("binary"),
                    "disagrees": s.get("label") is not None and e.label != s.get("label"),
                    **{c: s.get(c) for c in ("slide", "x", "y", "tile_size") if c in s}})
    return out


def history(store: Store, table: str, row_id: str) -> list[dict[str, Any]]:
    """Every event of one row, oldest first (model predictions included)."""
    return [{**r, "time": r["time"].isoformat()} for r in read_events(store, table, [row_id]).to_pylist()]


def review_counts(store: Store, table: str) -> dict[str, Any]:
    """Events, reviewed rows, reviewers and reviewed labels of `table`, for `labels list` and the viewer."""
    log = read_events(store, table)
    reviews = [e for e in latest_events(store, table).values() if e.label is not None]
    return {"table": table, "events": log.num_rows, "reviewed_rows": len(reviews),
            "reviewers": dict(Counter(e.reviewer or "" for e in reviews)),
            "labels": dict(Counter(e.label for e in reviews)),
            "sources": dict(Counter(log.column("source").to_pylist()))}
