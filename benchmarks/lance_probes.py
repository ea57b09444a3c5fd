"""Recall and latency of the `lance` kind against its query settings (IVF partitions visited, re-ranking factor) on
a kept cohort-scale store of `search_latency.py --store DIR`, to choose `lance_index.NPROBES` / `REFINE_FACTOR`.

The query rows are drawn with their own seed (`--seed`, not the one `search_latency.py` reports with), so the
settings are not chosen on the reported queries; recall@10 is against exact neighbours by streamed brute force.

    .venv/bin/python benchmarks/lance_probes.py --store /work/bench10m/store --rows 10000000 \\
        --nprobes 32,64,128 --refine 10,20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import numpy as np
from search_latency import ClusteredSource, exact_top_streamed, written_chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--rows", type=int, required=True, help="the --rows of the run that wrote the store")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--nprobes", default="32,64,128")
    ap.add_argument("--refine", default="10,20")
    ap.add_argument("--json")
    args = ap.parse_args()
    info = _common.machine()
    _common.print_machine(info)
    from cytoretrieve.store import lance_index
    from cytoretrieve.store.ann import l2_normalise
    from cytoretrieve.store.tables import Store

    table = Store(args.store).open(f"synthetic_{args.dim}")
    held = table.count()
    chunks = written_chunks(0, args.rows) + written_chunks(args.rows, held - args.rows)
    source = ClusteredSource(held, args.dim)
    picks = np.random.default_rng(args.seed).choice(args.rows, size=args.queries, replace=False)
    start = time.perf_counter()
    truth = exact_top_streamed(source, picks, 10, chunks)
    print(f"{held} rows, {lance_index.partitions(held)} partitions at build size; exact neighbours of {len(picks)} "
          f"queries in {time.perf_counter() - start:.0f} s")
    index = lance_index.table_index(table)
    queries = l2_normalise(source.rows(picks))
    ids = [f"c{i:07d}" for i in sorted({i for row in truth for i in row} | set(picks.tolist()))]
    rows = table.read(["id", "key"], f"id IN ({', '.join(repr(i) for i in ids)})")
    key = dict(zip(rows.column("id").to_pylist(), rows.column("key").to_pylist()))
    results = []
    for nprobes in (int(v) for v in args.nprobes.split(",")):
        for refine in (int(v) for v in args.refine.split(",")):
            lance_index.NPROBES, lance_index.REFINE_FACTOR = nprobes, refine
            index.search(queries[:1], 11)  # warm-up
            lat, recall = [], []
            for q, (row, want) in enumerate(zip(picks, truth)):
                t0 = time.perf_counter()
                _, found = index.search(queries[q:q + 1], 11)
                lat.append(time.perf_counter() - t0)
                got = set(found[0].tolist()) - {key[f"c{row:07d}"]}
                recall.append(len(got & {key[f"c{i:07d}"] for i in want}) / 10)
            r = {"nprobes": nprobes, "refine": refine, "recall_at_10": float(np.mean(recall)),
                 "p50_ms": _common.percentile(lat, 50) * 1e3, "p95_ms": _common.percentile(lat, 95) * 1e3}
            results.append(r)
            print(f"nprobes {nprobes:4d} refine {refine:3d}: recall@10 {r['recall_at_10']:.4f}, p50 {r['p50_ms']:.1f} ms, "
                  f"p95 {r['p95_ms']:.1f} ms", flush=True)
    info["loadavg_end"] = _common.print_load("at the end")
    _common.write_json(args.json, {"machine": info, "rows": held, "results": results})


if __name__ == "__main__":
    main()
