"""A table's labelled vectors (`queries/labels.labelled_vectors`) kept in a snapshot (`store/snapshot.py`), so that
a short command (`classify`) answers without importing LanceDB while the table and the label log are unchanged.

The snapshot holds every row's id, stored label and binary, its label and binary under reviewed labels (as
`reviewed_columns` gave them), and its vector, in the table's row order, plus the review counts of `LabelsUsed`:
either `labels` choice is answered from it exactly as through LanceDB. It is written by `keep` after a command has
read the table through LanceDB, tied to the newest manifests of the table and of the label log (a new review
makes it stale), and only for tables without duplicated ids (the protocols refuse those, with LanceDB's count).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from cytoretrieve.errors import CytoError
from cytoretrieve.store import snapshot
from cytoretrieve.store.snapshot import Snapshot

if TYPE_CHECKING:
    from cytoretrieve.store.tables import VectorTable

LOG = "label_log"  # `store.labels.LABELS_TABLE`, which this module cannot import (it imports LanceDB); tested equal
COLUMNS = ("id", "label", "binary", "reviewed_label", "reviewed_binary", "vector")
COUNTS = ("reviewed_rows", "changed_rows", "unsure_rows")  # of `LabelsUsed`, the same under either choice
log = logging.getLogger("cytoretrieve")


def read(uri: str, name: str) -> Snapshot | None:
    """Table `name`'s labelled-vectors snapshot when it is current, else None (read the table through LanceDB)."""
    snap = snapshot.read(uri, name, COLUMNS)
    ok = snap is not None and isinstance(snap.info, dict) and all(isinstance(snap.info.get(c), int) for c in COUNTS)
    return snap if ok else None


def labelled(snap: Snapshot, labels: str) -> tuple[np.ndarray, list[str | None], int]:
    """(vectors, each row's label under `labels`, rows carrying a review): what `labelled_vectors(table, ["label"],
    labels)` and its `LabelsUsed.reviewed_rows` give for the table."""
    if labels not in ("stored", "reviewed"):  # `queries.labels.check_labels`' message
        raise CytoError(f"`labels` must be stored or reviewed, not {labels!r}")
    column = "label" if labels == "stored" else "reviewed_label"
    return snap.vectors(), snap.rows.column(column).to_pylist(), int(snap.info["reviewed_rows"])


def keep(table: VectorTable) -> bool:
    """Write `table`'s snapshot for the next command, read at the version `table` holds (a table over
    `snapshot.MAX_BYTES` drops its old one). Housekeeping after a read through LanceDB: any failure only means the
    next command reads LanceDB again; True when written."""
    try:
        if not snapshot.fits(table):
            snapshot.drop(table.store.uri, table.name)
            return False
        before = snapshot.keys(table.store.uri, [table.name, LOG])
        if before is None:
            return False
        from cytoretrieve.queries.labels import reviewed_columns
        from cytoretrieve.store.tables import duplicated_rows

        rows = table.read(["id", "label", "binary", "vector"])
        if duplicated_rows(rows.column("id")):
            return False
        label, binary, used = reviewed_columns(table.store, table.name, rows.column("id").to_pylist(),
                                               rows.column("label").to_pylist(), rows.column("binary").to_pylist(),
                                               "reviewed")
        rows = pa.table({"id": rows.column("id"), "label": rows.column("label"), "binary": rows.column("binary"),
                         "reviewed_label": pa.array(label, pa.string()), "reviewed_binary": pa.array(binary, pa.int8()),
                         "vector": rows.column("vector")})
        return snapshot.write(table, before, rows, {c: getattr(used, c) for c in COUNTS})
    except Exception as e:  # noqa: BLE001 - the command has its answer; the snapshot is only a shortcut
        log.debug("table %s: no snapshot kept (%s)", table.name, e)
        return False
