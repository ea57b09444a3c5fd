"""Saved tile scores: each named `score --save-scores NAME` run's out-of-fold tile scores, kept in the store so the
viewer can list a slide's runs and draw one over the slide.

Two store-wide tables without vectors (hidden from the viewer's table list, like `label_log`), both append-only:

- `tile_scores` (kind `tile_scores`), one row per scored tile of a save: `save` (the save's id), `run` (its name),
  `table_name` and `table_version` (the vector table scored, at which version), `method`, `slide`, `tile_id`,
  level-0 `x`, `y` and `side` (null for rows without a place on a slide), `tile_size`, `score` (the tile score as
  the heat maps colour it, `views.heatmap.display_scores`), `slide_score`, `fold`, `created`.
- `tile_score_runs` (kind `tile_score_runs`), one row per save: its id, name, method, table and version, tile and
  slide counts, the run's colour scale (`lo`, `hi`: the 1st and 99th percentile of its tile scores, shared by all its
  slides, as the heat maps do), `created`.

A save writes its tile rows first and its run row last: the run row is the commit point, so a save killed in
between leaves rows no reader sees (never a half run). A name's current save is its latest run row; saving a name
again is refused unless `overwrite`, which appends a new save that replaces the old one for every reader (nothing is
deleted, nothing is shown twice). Saves are serialised by the `tile_scores` write lease (between processes) and a lock
(between the threads of one process), so two writers of one name cannot both win.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cytoretrieve.errors import CytoError
from cytoretrieve.faults import failpoint
from cytoretrieve.store.filters import all_of, equals, one_of
from cytoretrieve.store.tables import META_KEY, Store, retry_commit

SCORES_TABLE = "tile_scores"
RUNS_TABLE = "tile_score_runs"
PERCENTILES = (1.0, 99.0)  # the run's colour scale (as `views.heatmap`)
LEASE_WAIT = 60.0  # s a save waits for another save
_saving = threading.Lock()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

SCORE_FIELDS = [
    pa.field("save", pa.string(), nullable=False),
    pa.field("run", pa.string(), nullable=False),
    pa.field("table_name", pa.string(), nullable=False),
    pa.field("table_version", pa.int64(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("slide", pa.string()),
    pa.field("tile_id", pa.string(), nullable=False),
    pa.field("x", pa.int64()),
    pa.field("y", pa.int64()),
    pa.field("side", pa.float32()),
    pa.field("tile_size", pa.int64()),
    pa.field("score", pa.float64()),
    pa.field("slide_score", pa.float64()),
    pa.field("fold", pa.int32()),
    pa.field("created", pa.timestamp("us", tz="UTC"), nullable=False),
]
RUN_FIELDS = [
    pa.field("save", pa.string(), nullable=False),
    pa.field("run", pa.string(), nullable=False),
    pa.field("table_name", pa.string(), nullable=False),
    pa.field("table_version", pa.int64(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("tiles", pa.int64(), nullable=False),
    pa.field("slides", pa.int64(), nullable=False),
    pa.field("lo", pa.float64()),
    pa.field("hi", pa.float64()),
    pa.field("created", pa.timestamp("us", tz="UTC"), nullable=False),
]
SCORE_SCHEMA = pa.schema(SCORE_FIELDS, metadata={META_KEY: json.dumps({"kind": SCORES_TABLE}).encode()})
RUN_SCHEMA = pa.schema(RUN_FIELDS, metadata={META_KEY: json.dumps({"kind": RUNS_TABLE}).encode()})
LAYER_COLUMNS = ("x", "y", "side", "score", "tile_id", "slide_score", "fold")  # what a slide's layer reads
TILE_COLUMNS = ("slide", "tile_id", "x", "y", "side", "tile_size", "score", "slide_score", "fold")


@dataclass(frozen=True)
class ScoreRun:
    """One save of a named run (a row of `tile_score_runs`)."""

    save: str
    run: str
    table_name: str
    table_version: int
    method: str
    tiles: int
    slides: int
    lo: float | None
    hi: float | None
    created: datetime.datetime

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created"] = self.created.isoformat(timespec="seconds")
        return d


def check_run_name(name: str) -> str:
    """`name` if it can name a score run (letters, digits, `.`, `_`, `-`; up to 64), else `CytoError`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise CytoError(f"`save_scores` {str(name)[:80]!r} is not a run name: use letters, digits, '.', '_', '-' "
                        "(up to 64, starting with a letter or digit)")
    return name


def _open(store: Store, name: str) -> Any:  # noqa: ANN401 - a lancedb table (or None)
    if name not in store.table_names():
        return None
    try:
        return store.db.open_table(name)
    except ValueError:  # listed while its creator has not committed its first version yet: nothing to read
        return None


def _open_or_create(store: Store, name: str, schema: pa.Schema) -> Any:  # noqa: ANN401 - call with the lease held
    found = _open(store, name)
    return found if found is not None else store.db.create_table(name, schema=schema, exist_ok=True)


def _runs(store: Store, where: str | None = None) -> list[ScoreRun]:
    tbl = _open(store, RUNS_TABLE)
    if tbl is None:
        return []
    query = tbl.search().select([f.name for f in RUN_FIELDS]).limit(None)
    if where:
        query = query.where(where)
    return [ScoreRun(**r) for r in query.to_arrow().to_pylist()]


def current_runs(store: Store) -> dict[str, ScoreRun]:
    """{run name: its current save} (the latest save of each name)."""
    out: dict[str, ScoreRun] = {}
    for r in sorted(_runs(store), key=lambda r: (r.created, r.save)):
        out[r.run] = r
    return out


def find_run(store: Store, name: str) -> ScoreRun | None:
    """The current save of run `name`, None when nothing was saved under it."""
    found = sorted(_runs(store, equals("run", name)), key=lambda r: (r.created, r.save))
    return found[-1] if found else None


def save_scores(store: Store, name: str, table_name: str, table_version: int, method: str,
                tiles: Sequence[dict[str, Any]], *, overwrite: bool = False) -> ScoreRun:
    """Save one run's tile scores under `name` (rows with the keys of `TILE_COLUMNS`); a name already saved is
    refused unless `overwrite` (then this save replaces it for readers; see the module docstring)."""
    check_run_name(name)
    if not tiles:
        raise CytoError(f"run '{name}' has no tile scores to save")
    with _saving:  # threads of one process share its lease: a lock orders them
        return _save(store, name, table_name, table_version, method, tiles, overwrite)


def _save(store: Store, name: str, table_name: str, table_version: int, method: str,
          tiles: Sequence[dict[str, Any]], overwrite: bool) -> ScoreRun:
    lease = store.lease(SCORES_TABLE, wait=LEASE_WAIT)
    try:
        if not overwrite and find_run(store, name) is not None:
            raise CytoError(f"a score run named '{name}' is already saved: choose another `save_scores` name or "
                            "pass `overwrite`")
        save, created = uuid.uuid4().hex, datetime.datetime.now(datetime.UTC)
        common = {"save": save, "run": name, "table_name": table_name, "table_version": int(table_version),
                  "method": method, "created": created}
        rows = pa.Table.from_pylist([{**common, **{k: t.get(k) for k in TILE_COLUMNS}} for t in tiles],
                                    schema=SCORE_SCHEMA)
        scores = rows.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        finite = scores[np.isfinite(scores)]
        lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES)) if finite.size else (None, None)
        slides = len({t.get("slide") for t in tiles if t.get("slide") is not None})
        record = ScoreRun(save, name, table_name, int(table_version), method, len(tiles), slides, lo, hi, created)
        scores_tbl = _open_or_create(store, SCORES_TABLE, SCORE_SCHEMA)
        retry_commit(lambda: scores_tbl.add(rows))
        failpoint("scores-commit")  # rows written, run not yet: readers must not see it
        runs_tbl = _open_or_create(store, RUNS_TABLE, RUN_SCHEMA)
        retry_commit(lambda: runs_tbl.add(pa.Table.from_pylist([asdict(record)], schema=RUN_SCHEMA)))
        return record
    finally:
        lease.release()


def slide_runs(store: Store, slide: str) -> list[tuple[ScoreRun, int]]:
    """The current runs that scored tiles of `slide`, each with that slide's tile count, newest first."""
    runs = current_runs(store)
    tbl = _open(store, SCORES_TABLE)
    if not runs or tbl is None:
        return []
    by_save = {r.save: r for r in runs.values()}
    where = all_of(equals("slide", slide), one_of("save", list(by_save)))
    saves = tbl.search().select(["save"]).where(where).limit(None).to_arrow().column("save").to_pylist()
    counts: dict[str, int] = {}
    for s in saves:
        counts[s] = counts.get(s, 0) + 1
    found = [(by_save[s], n) for s, n in counts.items()]
    return sorted(found, key=lambda rn: (rn[0].created, rn[0].save), reverse=True)


def run_tiles(store: Store, name: str, slide: str, limit: int | None = None) -> tuple[ScoreRun | None, pa.Table]:
    """Run `name`'s current save and its tiles of `slide` that have a place (`LAYER_COLUMNS`), at most
    `limit`; (None, empty) when no run of that name was saved."""
    run = find_run(store, name)
    tbl = _open(store, SCORES_TABLE)
    empty = pa.schema([f for f in SCORE_FIELDS if f.name in LAYER_COLUMNS]).empty_table()
    if run is None or tbl is None:
        return run, empty
    where = all_of(equals("save", run.save), equals("slide", slide), "x IS NOT NULL AND y IS NOT NULL")
    query = tbl.search().select(list(LAYER_COLUMNS)).where(where).limit(limit)
    return run, query.to_arrow()
