"""Two reviewers labelling at once through the viewer's HTTP API: is every event stored once, in order, and how fast?

    nice .venv/bin/python benchmarks/label_concurrency.py [--events 500] [--reviewers 2] [--rows 40] [--batch 1]
                                                          [--json out.json]

1. A small vector table (`--rows` rows of 3 classes, 8-d clustered vectors, the label map `embed` records) is
   written through the store API into a scratch store.
2. `cytoretrieve serve --store ...` starts as a separate process on a free loopback port (no token: loopback).
3. `--reviewers` client threads, each with its own keep-alive HTTP client, start together and each POSTs
   `--events` label events to `/api/tables/T/labels` (`--batch` events per request; 1 = one click each). Reviewer r's
   i-th event labels row `i % rows` (every reviewer works over the same rows, so their writes to one row interleave)
   with a class cycling over the table's classes, and carries the note `r:i`.
4. Checks on the log read back from the store (`read_events`): every request answered 200, exactly
   reviewers x events events stored, each event id once, each sent note once; per row and reviewer the notes in
   log order are the order they were sent; and, as a diagnostic, how many events' `supersedes` is the row's
   previous event in log order (a write that reads the row's current review while the other reviewer's write to the
   same row is in flight can name an older one: the history forks, nothing is lost).
5. Figures: events/s over the concurrent phase (first request sent to last answer), p50 / p95 request latency,
   and the p50 of each reviewer's first and last tenth of requests (does a write cost more as the log grows?).

`--growth N` instead times `record_labels` in this process (no server, no HTTP), one event per call as a click
makes it, while the log grows to N events, and then once more after compacting the log's LanceDB table
(`optimize()`): is the cost of a write the log's size, or its number of commits (fragments)?
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _common
import numpy as np

TABLE = "bench_labels"
CLASSES = ["A", "B", "C"]
LABEL_MAP = {"classes": CLASSES, "binary": {"A": 0, "B": 1, "C": 1}, "names": {}}
DIM = 8


def make_table(store_uri: str, rows: int) -> None:
    """`rows` rows of 3 classes (the stored label = the cluster) through the store API."""
    from cytoretrieve.store.tables import Store

    rng = np.random.default_rng(0)
    table = Store(store_uri).create_or_open(TABLE, {"arch": "resnet18", "fingerprint": "b" * 64, "dim": DIM},
                                            {"name": "bench", "labels": LABEL_MAP})
    labels = [CLASSES[i % 3] for i in range(rows)]
    vectors = np.array([np.eye(DIM)[i % 3] + 0.1 * rng.standard_normal(DIM) for i in range(rows)], np.float32)
    table.add(table.make_rows([{"id": f"row/{i}", "label": lab, "binary": LABEL_MAP["binary"][lab]}
                               for i, lab in enumerate(labels)], vectors))
    table.finish()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reviewer(base: str, name: str, events: int, rows: int, batch: int, barrier: threading.Barrier
             ) -> dict[str, Any]:
    """Send `events` label events as `name`, `batch` per request; the status codes and latencies (s)."""
    import httpx

    url = f"{base}/api/tables/{TABLE}/labels"
    codes, latencies, errors = [], [], []
    with httpx.Client(timeout=120) as client:
        client.get(f"{base}/api/tables")  # open the keep-alive connection before the start
        barrier.wait()
        for lo in range(0, events, batch):
            items = [{"id": f"row/{i % rows}", "label": CLASSES[(i // rows + i) % 3], "note": f"{name}:{i}"}
                     for i in range(lo, min(events, lo + batch))]
            t0 = time.perf_counter()
            try:
                r = client.post(url, json={"reviewer": name, "labels": items})
                codes.append(r.status_code)
                if r.status_code != 200:
                    errors.append(r.text[:200])
            except httpx.HTTPError as e:
                codes.append(0)
                errors.append(repr(e)[:200])
            latencies.append(time.perf_counter() - t0)
    return {"codes": codes, "latencies": latencies, "errors": errors, "end": time.perf_counter()}


def check_log(store_uri: str, names: list[str], events: int) -> dict[str, Any]:
    """Every event stored once, in the order each reviewer sent it per row; the supersedes chain diagnostic."""
    from cytoretrieve.store.labels import read_events
    from cytoretrieve.store.tables import Store

    log = read_events(Store(store_uri), TABLE).to_pylist()
    notes = [e["note"] for e in log]
    expected = {f"{n}:{i}" for n in names for i in range(events)}
    per_row: dict[tuple[str, str], list[int]] = defaultdict(list)
    previous: dict[str, str | None] = {}
    chained = 0
    for e in log:  # in log order: (time, event)
        name, i = e["note"].split(":")
        per_row[(e["row_id"], name)].append(int(i))
        chained += e["supersedes"] == previous.get(e["row_id"])
        previous[e["row_id"]] = e["event"]
    return {"stored": len(log), "unique_event_ids": len({e["event"] for e in log}),
            "notes_once": len(notes) == len(set(notes)) and set(notes) == expected,
            "order_per_row_kept": all(v == sorted(v) for v in per_row.values()),
            "rows_x_reviewers": len(per_row), "supersedes_previous": chained}


def growth(store_uri: str, n: int, rows: int) -> dict[str, Any]:
    """ms per one-event `record_labels` call in blocks of the log's growth to n events, then after compaction."""
    from cytoretrieve.store.labels import LABELS_TABLE, LabelInput, record_labels
    from cytoretrieve.store.tables import Store

    store = Store(store_uri)

    def one(i: int) -> float:
        t0 = time.perf_counter()
        record_labels(store, TABLE, [LabelInput(f"row/{i % rows}", CLASSES[i % 3], note=str(i))], reviewer="g")
        return 1000 * (time.perf_counter() - t0)

    block = max(1, n // 10)
    ms = [one(i) for i in range(n)]
    blocks = {f"{lo}-{lo + block}": round(_common.median(ms[lo:lo + block]), 1) for lo in range(0, n, block)}
    store.db.open_table(LABELS_TABLE).optimize()
    after = [one(n + i) for i in range(block)]
    return {"ms_per_write_by_log_size": blocks, "after_compaction_ms": round(_common.median(after), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500, help="Events per reviewer.")
    parser.add_argument("--reviewers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=40, help="Rows of the table (every reviewer labels them all).")
    parser.add_argument("--batch", type=int, default=1, help="Events per request (1: one click each).")
    parser.add_argument("--growth", type=int, default=0, help="Time in-process writes as the log grows to N.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    info = _common.machine()
    _common.print_machine(info)
    if args.growth:
        with tempfile.TemporaryDirectory() as scratch:
            make_table(str(Path(scratch) / "store"), args.rows)
            out = {"machine": info, "args": vars(args), **growth(str(Path(scratch) / "store"), args.growth, args.rows),
                   "loadavg_end": _common.loadavg()}
        print(f"record_labels, one event per call, median ms per write by log size: "
              f"{out['ms_per_write_by_log_size']}; after compacting the log: {out['after_compaction_ms']} ms; "
              f"load {info['loadavg_start']} -> {out['loadavg_end']}")
        _common.write_json(args.json, out)
        return
    names = [f"reviewer{r}" for r in range(args.reviewers)]
    with tempfile.TemporaryDirectory() as scratch:
        store_uri = str(Path(scratch) / "store")
        make_table(store_uri, args.rows)
        port = free_port()
        proc = _common.start_server(store_uri, port)
        try:
            barrier = threading.Barrier(args.reviewers + 1)
            results: dict[str, dict[str, Any]] = {}

            def run(name: str) -> None:
                results[name] = reviewer(f"http://127.0.0.1:{port}", name, args.events, args.rows, args.batch,
                                         barrier)

            threads = [threading.Thread(target=run, args=(n,)) for n in names]
            for t in threads:
                t.start()
            barrier.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
            wall = max(r["end"] for r in results.values()) - start
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        checks = check_log(store_uri, names, args.events)
    latencies = [x for r in results.values() for x in r["latencies"]]
    tenth = max(1, len(latencies) // (10 * args.reviewers))
    first = [x for r in results.values() for x in r["latencies"][:tenth]]
    last = [x for r in results.values() for x in r["latencies"][-tenth:]]
    codes = [c for r in results.values() for c in r["codes"]]
    errors = [e for r in results.values() for e in r["errors"]]
    sent = args.reviewers * args.events
    out = {"machine": info, "args": vars(args), "events_sent": sent, "requests": len(codes),
           "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 3),
           "events_per_s": round(sent / wall, 1), "p50_ms": round(1000 * _common.percentile(latencies, 50), 1),
           "p95_ms": round(1000 * _common.percentile(latencies, 95), 1),
           "first_tenth_p50_ms": round(1000 * _common.percentile(first, 50), 1),
           "last_tenth_p50_ms": round(1000 * _common.percentile(last, 50), 1), **checks,
           "latencies_ms": {n: [round(1000 * x, 1) for x in r["latencies"]] for n, r in results.items()},
           "loadavg_end": _common.loadavg()}
    print(f"{args.reviewers} reviewers x {args.events} events, {args.batch} per request, over {args.rows} rows "
          f"(cytoretrieve serve, loopback): {len(codes)} requests, {len(errors)} errors")
    print(f"stored {checks['stored']} events ({checks['unique_event_ids']} distinct ids; every note once: "
          f"{checks['notes_once']}); order per row and reviewer kept: {checks['order_per_row_kept']}; "
          f"supersedes = the row's previous event: {checks['supersedes_previous']} of {checks['stored']}")
    print(f"{out['events_per_s']} events/s over {wall:.1f} s; request latency p50 {out['p50_ms']} ms, "
          f"p95 {out['p95_ms']} ms (first tenth p50 {out['first_tenth_p50_ms']} ms, last tenth "
          f"{out['last_tenth_p50_ms']} ms); load {info['loadavg_start']} -> {out['loadavg_end']}")
    _common.write_json(args.json, out)
    ok = (not errors and checks["stored"] == sent and checks["unique_event_ids"] == sent and checks["notes_once"]
          and checks["order_per_row_kept"])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
