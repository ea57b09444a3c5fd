"""The label log: an append-only table of review events, so that an expert's labels feed back into the queries
while the labels stored at embed time are never overwritten.

One store-wide table, `label_log` (kind `labels`, no vectors: hidden from the viewer's table list like
`slide_overviews`), one row per event:

| column | meaning |
|---|---|
| `event` | the event's id (32 hex characters, unique) |
| `table_name`, `row_id` | the vector (or tile) table and the row the event labels |
| `label`, `binary` | the class given (null: back to no review, after an undo) and its binary value (1, 0, null) |
| `reviewer` | who labelled (a name; the viewer asks it once) |
| `time` | when (UTC, microseconds; strictly increasing within one process) |
| `source` | `expert` (labelled by hand), `import` (a CSV / QuPath file), `model` (a prediction, never a review) |
| `note` | free text, optional |
| `supersedes` | the event this one replaces: the row's review at the time of writing (null for a first review) |
| `action` | `label` or `undo` (an undo of event E gives back the label E superseded, and supersedes E) |

A row's history is its events in (`time`, `event`) order; its current review is the last of its events whose
source is a review source (`REVIEW_SOURCES`). Nothing is ever updated or deleted: each `append_events` call is one
LanceDB append (one commit, retried while it loses a race to another writer), so concurrent writers (two
reviewers, two processes) lose nothing and a killed writer loses at most the events of the call it was in.
A write that reads the log first (a label supersedes the row's current review; an undo gives back an earlier one)
holds the log's write section (`_writing`: a lock between threads, the log's lease between processes), so two
reviewers of one row form one chain of `supersedes`, never a fork. Every `COMPACT_EVERY` commits the writer
compacts the log, so that one event per click does not leave reads scanning thousands of small fragments.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from cytoretrieve.errors import CytoError
from cytoretrieve.faults import failpoint
from cytoretrieve.store.filters import all_of, equals, one_of
from cytoretrieve.store.tables import KEEP_VERSIONS, META_KEY, Store, retry_commit

log = logging.getLogger(__name__)

LABELS_TABLE = "label_log"
LABELS_KIND = "labels"
SOURCES = ("expert", "import", "model")
REVIEW_SOURCES = ("expert", "import")  # events that count as a review (a model's prediction does not)
COMPACT_EVERY = 64  # commits of the log between two compactions
LEASE_WAIT = 60.0  # seconds a writer waits for another process's write section
UNSURE = "unsure"  # always accepted: the reviewer doubts the row's label (reviewed labels leave the row out)
FIELDS = [
    pa.field("event", pa.string(), nullable=False),
    pa.field("table_name", pa.string(), nullable=False),
    pa.field("row_id", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("binary", pa.int8()),
    pa.field("reviewer", pa.string()),
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("note", pa.string()),
    pa.field("supersedes", pa.string()),
    pa.field("action", pa.string(), nullable=False),
]
SCHEMA = pa.schema(FIELDS, metadata={META_KEY: json.dumps({"kind": LABELS_KIND}).encode()})
COLUMNS = [f.name for f in FIELDS]


@dataclass(frozen=True)
class LabelEvent:
    """One event of the log (see the module docstring for the columns)."""

    event: str
    table_name: str
    row_id: str
    label: str | None
    binary: int | None
    reviewer: str | None
    time: datetime.datetime
    source: str
    note: str | None = None
    supersedes: str | None = None
    action: str = "label"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = self.time.isoformat()
        return d


_clock = threading.Lock()
_last = [datetime.datetime.min.replace(tzinfo=datetime.UTC)]


def now() -> datetime.datetime:
    """UTC now at microseconds, strictly after the previous call in this process (so one writer's events keep
    their order even within one microsecond)."""
    with _clock:
        t = datetime.datetime.now(datetime.UTC)
        if t <= _last[0]:
            t = _last[0] + datetime.timedelta(microseconds=1)
        _last[0] = t
        return t


def new_event(table: str, row: str, label: str | None, binary: int | None, reviewer: str | None, *,
              source: str = "expert", note: str | None = None, supersedes: str | None = None,
              action: str = "label") -> LabelEvent:
    """A new event with a fresh id and time (not stored yet: `append_events` stores it)."""
    if source not in SOURCES:
        raise CytoError(f"`source` must be one of {', '.join(SOURCES)}, not {source!r}")
    return LabelEvent(uuid.uuid4().hex, table, row, label, None if binary is None else int(binary),
                      reviewer or None, now(), source, note or None, supersedes, action)


_creating = threading.Lock()


def _log_table(store: Store, create: bool) -> Any:  # noqa: ANN401 - a lancedb table (or None)
    """The log's LanceDB table (None when there is none and `create` is False).

    Creating it is not atomic in LanceDB: two writers creating it at once can both commit, the second as an
    overwrite of the first's events. So creation is serialised, by a lock between threads and the log's write
    lease between processes (a remote store: between the processes of one machine), and the name checked again.
    """
    if LABELS_TABLE in store.table_names():
        return _open_log(store)
    if not create:
        return None
    with _creating:
        lease = store.lease(LABELS_TABLE, wait=60.0)
        try:
            if LABELS_TABLE in store.table_names():
                return _open_log(store)
            return store.db.create_table(LABELS_TABLE, schema=SCHEMA)
        finally:
            lease.release()


def _open_log(store: Store, attempts: int = 40) -> Any:  # noqa: ANN401 - a lancedb table
    """Open the log, waiting while another writer is still creating it: its folder is listed before its first
    version is committed, and opening it in between says "not found"."""
    for attempt in range(attempts):
        try:
            return store.db.open_table(LABELS_TABLE)
        except ValueError as e:
            if "not found" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(min(0.02 * 2 ** attempt, 0.5))
    raise AssertionError("unreachable")


_sections: dict[str, threading.Lock] = {}
_sections_lock = threading.Lock()


@contextmanager
def _writing(store: Store) -> Iterator[None]:
    """The log's write section: one writer at a time reads the current reviews and appends (a lock between this
    process's threads, the log's write lease between processes)."""
    _log_table(store, create=True)  # created first: creating takes the same lease
    with _sections_lock:
        lock = _sections.setdefault(str(store.uri), threading.Lock())
    with lock:
        lease = store.lease(LABELS_TABLE, wait=LEASE_WAIT, poll=0.01)
        try:
            yield
        finally:
            lease.release()


def append_events(store: Store, events: Sequence[LabelEvent]) -> list[LabelEvent]:
    """Store these events in one append (one commit: all or none of them), retried while it loses a race; every
    `COMPACT_EVERY` versions of the log, compact it (a failed compaction is left for a later writer)."""
    if not events:
        return []
    rows = pa.Table.from_pylist([asdict(e) for e in events], schema=SCHEMA)
    tbl = _log_table(store, create=True)
    failpoint("label-commit")
    retry_commit(lambda: tbl.add(rows))
    if tbl.version % COMPACT_EVERY == 0:
        try:
            retry_commit(lambda: tbl.optimize(cleanup_older_than=KEEP_VERSIONS))
        except (RuntimeError, OSError, ValueError) as e:  # the events are stored: compaction can wait
            log.warning("label log: compaction left for a later writer (%s)", e)
    return list(events)


def read_events(store: Store, table: str | None = None, rows: Iterable[str] | None = None) -> pa.Table:
    """The log's events (of `table`, of these `rows` of it), sorted by (`time`, `event`): the order they happened.
    An empty table of the log's schema when nothing was logged."""
    tbl = _log_table(store, create=False)
    if tbl is None:
        return SCHEMA.empty_table()
    wanted = None if rows is None else sorted(set(rows))
    where = all_of(equals("table_name", table) if table is not None else None,
                   one_of("row_id", wanted) if wanted is not None and len(wanted) <= 1000 else None)
    query = tbl.search().select(COLUMNS).limit(None)
    if where:
        query = query.where(where)
    found = query.to_arrow()
    if wanted is not None and len(wanted) > 1000:
        import pyarrow.compute as pc

        found = found.filter(pc.is_in(found.column("row_id"), pa.array(wanted)))
    return found.sort_by([("time", "ascending"), ("event", "ascending")]).cast(SCHEMA)


def events_of(table: pa.Table) -> list[LabelEvent]:
    """The rows of `read_events` as `LabelEvent`s."""
    return [LabelEvent(**row) for row in table.to_pylist()]


def latest_events(store: Store, table: str, rows: Iterable[str] | None = None,
                  sources: Sequence[str] = REVIEW_SOURCES) -> dict[str, LabelEvent]:
    """{row id: its latest event among `sources`}: the current review of every reviewed row (undone-to-nothing
    rows included, with label None)."""
    log = read_events(store, table, rows)
    latest: dict[str, dict[str, Any]] = {}
    for row in log.to_pylist():  # sorted by time: the last one wins
        if row["source"] in sources:
            latest[row["row_id"]] = row
    return {r: LabelEvent(**row) for r, row in latest.items()}


# --------------------------------------------------------------------------------------- writing, validated


@dataclass(frozen=True)
class LabelInput:
    """A label to record for one row: what a CLI line, a CSV / GeoJSON row or an HTTP request gives."""

    row_id: str
    label: str
    reviewer: str | None = None
    note: str | None = None


def table_classes(store: Store, table: str) -> tuple[list[str], dict[str, int | None], set[str]]:
    """(classes, binary per class, every row id) of `table`: the label map's classes and the stored labels, plus
    classes already given in the log (with `new_class`)."""
    from cytoretrieve.store.tables import Table

    t = Table(store, store.open_raw(table))
    label_map = (t.meta.get("dataset") or {}).get("labels") or {}
    data = t.read(["id", "label", "binary"])
    classes = [str(c) for c in label_map.get("classes", [])]
    binary: dict[str, int | None] = {str(c): v for c, v in (label_map.get("binary") or {}).items()}
    for lab, b in zip(data.column("label").to_pylist(), data.column("binary").to_pylist()):
        if lab and lab not in binary:
            binary[lab] = b
            classes.append(lab)
    for lab, b in zip(*(read_events(store, table).column(c).to_pylist() for c in ("label", "binary"))):
        if lab and lab != UNSURE and lab not in binary:
            binary[lab] = b
            classes.append(lab)
    return list(dict.fromkeys(classes)), binary, set(data.column("id").to_pylist())


def record_labels(store: Store, table: str, items: Sequence[LabelInput], *, reviewer: str | None = None,
                  source: str = "expert", new_class: bool = False, binary: int | None = None) -> list[LabelEvent]:
    """Check then store one event per item (one commit): every row id must be in `table` and every label among its
    classes (or `unsure`), unless `new_class` allows new ones (with binary `binary`). A refused item refuses all:
    nothing is written. Each event supersedes the row's current review."""
    if not items:
        return []
    if binary not in (None, 0, 1):
        raise CytoError(f"`binary` must be 1, 0 or empty, not {binary!r}")
    classes, binary_of, ids = table_classes(store, table)
    missing = sorted({i.row_id for i in items} - ids)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CytoError(f"{len(missing)} row id(s) not in table '{table}': {shown}; nothing written")
    empty = [i.row_id for i in items if not (i.label or "").strip()]
    if empty:
        raise CytoError(f"row '{empty[0]}' has no label ({len(empty)} row(s) without one); nothing written")
    unknown = sorted({i.label for i in items} - set(classes) - {UNSURE})
    if unknown and not new_class:
        raise CytoError(f"label(s) {', '.join(unknown)} not among the classes of table '{table}' "
                        f"({', '.join(classes) or 'none'}, or {UNSURE}): pass `new_class` to add them; nothing written")
    with _writing(store):  # the current reviews read and superseded in one section: one chain per row
        current = latest_events(store, table, {i.row_id for i in items})
        events = []
        for item in items:
            b = None if item.label == UNSURE else binary_of.get(item.label, binary)
            previous = current.get(item.row_id)
            events.append(new_event(table, item.row_id, item.label, b, item.reviewer or reviewer, source=source,
                                    note=item.note, supersedes=previous.event if previous else None))
            current[item.row_id] = events[-1]
        return append_events(store, events)


def undo(store: Store, table: str, row_id: str, reviewer: str | None = None) -> LabelEvent:
    """Undo the row's current review: a new event giving back the label that review superseded (None: no review),
    superseding it. Undoing an undo gives its label back (a redo)."""
    with _writing(store):
        current = latest_events(store, table, [row_id]).get(row_id)
        if current is None:
            raise CytoError(f"row '{row_id}' of table '{table}' has no review to undo")
        before = None
        if current.supersedes:
            found = [e for e in events_of(read_events(store, table, [row_id])) if e.event == current.supersedes]
            before = found[0] if found else None
        event = new_event(table, row_id, before.label if before else None, before.binary if before else None,
                          reviewer or current.reviewer, source=current.source, supersedes=current.event,
                          action="undo")
        return append_events(store, [event])[0]


def default_reviewer() -> str:
    """`CYTORETRIEVE_REVIEWER` when set, else the login name."""
    import getpass

    return os.environ.get("CYTORETRIEVE_REVIEWER") or getpass.getuser()


def undo_rows(store: Store, table: str, row_ids: Sequence[str], reviewer: str | None = None,
              events: Sequence[str] | None = None) -> list[LabelEvent]:
    """`undo` for many rows in one commit (the viewer's undo of a bulk action: all of it or none); every row must
    have a review, else nothing is written.

    With `events` (one event id per row: the action being undone), each row gets back the review it had before
    that event, whatever came after it: so undoing a page's actions one after another, latest first, walks back
    through them (a plain `undo` of a row whose latest event is an undo would redo instead)."""
    ids = list(dict.fromkeys(row_ids))
    if events is not None and len(events) != len(row_ids):
        raise CytoError(f"`events`: one per row ({len(row_ids)}), not {len(events)}")
    with _writing(store):
        current = latest_events(store, table, ids)
        missing = [r for r in ids if r not in current]
        if missing:
            raise CytoError(f"row '{missing[0]}' of table '{table}' has no review to undo "
                            f"({len(missing)} row(s) without one); nothing written")
        log = {e.event: e for e in events_of(read_events(store, table, ids))}
        undone = dict(zip(row_ids, events)) if events is not None else {r: current[r].event for r in ids}
        wrong = [r for r in ids if undone[r] not in log or log[undone[r]].row_id != r]
        if wrong:
            raise CytoError(f"`events`: no event {undone[wrong[0]]!r} of row '{wrong[0]}' in table '{table}'; "
                            "nothing written")
        out = []
        for r in ids:
            back = log.get(log[undone[r]].supersedes or "")
            out.append(new_event(table, r, back.label if back else None, back.binary if back else None,
                                 reviewer or current[r].reviewer, source=current[r].source,
                                 supersedes=current[r].event, action="undo"))
        return append_events(store, out)
