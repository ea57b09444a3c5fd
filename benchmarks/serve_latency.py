"""The viewer's HTTP latency on a 200k-row table: search by stored id, search by uploaded image, and throughput
under 8 concurrent clients, end to end through `cytoretrieve serve` (a separate process, real HTTP on loopback).

The table is written through the store API with the metadata of a real backbone (resnet18, seeded random weights
at 224 px: no internet here), so uploads are embedded by the server exactly as a user's are; its 200k vectors are
clustered synthetic ones (search_latency.clustered_vectors) of that backbone's dimension (512). The upload is a
real Herlev cell. Figures:
- by id: p50 / p95 over `--queries` sequential GET /api/tables/T/search?id=...&k=10 (random ids, keep-alive);
  target p50 <= 15 ms;
- by upload: p50 / p95 over `--queries` POSTs of the cell image (decode + embed + search + JSON), and the ratio of
  its p50 to the p50 of embedding the same image alone in this process (decode + preprocess + forward, same
  backbone, same thread count); target <= 1.3x. The two are timed in alternation (one upload, one embedding
  alone, ...) so that both see the same load on a shared machine;
- throughput: 8 client threads, each 50 queries alternating by id and by upload, and 8 x 50 by id only: queries/s.

    nice .venv/bin/python benchmarks/serve_latency.py                 # 200k rows, 200 queries each
    nice .venv/bin/python benchmarks/serve_latency.py --quick         # 20k rows, 40 queries each
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import _common
import numpy as np
from search_latency import clustered_vectors

INGEST_BATCH = 20_000
TABLE = "bench_resnet18"
LABELS = ["NS", "NI", "NC", "LD", "MD", "SD", "CIS"]


def make_table(store_uri: str, n: int, backbone: Any) -> float:
    """Write n clustered vectors with the backbone's metadata; seconds to ingest, finish and build the index."""
    from cytoretrieve.store.index import table_index
    from cytoretrieve.store.tables import Store

    start = time.perf_counter()
    table = Store(store_uri).create_or_open(TABLE, backbone.metadata(), {"name": "synthetic"})
    vectors = clustered_vectors(n, backbone.dim)
    for lo in range(0, n, INGEST_BATCH):
        hi = min(n, lo + INGEST_BATCH)
        rows = [{"id": f"c{i:07d}", "dataset": "synthetic", "label": LABELS[i % 7], "binary": int(i % 7 >= 3)}
                for i in range(lo, hi)]
        table.add(table.make_rows(rows, vectors[lo:hi]))
    table.finish()
    table_index(Store(store_uri).open(TABLE))  # built and cached once, as the first query after `embed` would
    return time.perf_counter() - start


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def summary(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": round(_common.percentile(seconds, 50) * 1e3, 2),
            "p95_ms": round(_common.percentile(seconds, 95) * 1e3, 2)}


def alternate(upload: Any, backbone: Any, image: bytes, n: int) -> tuple[list[float], list[float]]:
    """(upload seconds, embedding-alone seconds), timed in turn: the embedding alone is what the server does per
    upload without the server (decode + preprocess + forward)."""
    from cytoretrieve.models.inference import embed_images
    from cytoretrieve.queries.search import decode_image

    embed = lambda i: embed_images(backbone, [decode_image(image)], "cpu")  # noqa: E731
    embed(0)  # warm-up
    ups, alone = [], []
    for _i in range(n):
        ups += timed(upload, 1)
        alone += timed(embed, 1)
    return ups, alone


def run_clients(base: str, ids: list[str], image: bytes, mixed: bool) -> float:
    """Queries/s of 8 threads x 50 queries (alternating id / upload when `mixed`); every answer must be a 200."""
    import httpx

    def client(c: int) -> int:
        ok = 0
        with httpx.Client(timeout=120) as http:
            for q in range(50):
                if mixed and q % 2:
                    r = http.post(f"{base}/api/tables/{TABLE}/search", files={"image": image}, data={"k": "10"})
                else:
                    r = http.get(f"{base}/api/tables/{TABLE}/search", params={"id": ids[(c * 50 + q) % len(ids)], "k": 10})
                ok += r.status_code == 200
        return ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        done = sum(pool.map(client, range(8)))
    wall = time.perf_counter() - t0
    if done != 400:
        raise RuntimeError(f"{400 - done} of 400 concurrent queries failed")
    return 400 / wall


def measure(base: str, n_rows: int, queries: int, image: bytes, backbone: Any) -> dict[str, Any]:
    import httpx

    rng = np.random.default_rng(1)
    ids = [f"c{i:07d}" for i in rng.integers(0, n_rows, queries)]
    with httpx.Client(timeout=120) as http:
        by_id = lambda i: http.get(f"{base}/api/tables/{TABLE}/search", params={"id": ids[i], "k": 10}).raise_for_status()  # noqa: E731
        upload = lambda i: http.post(f"{base}/api/tables/{TABLE}/search", files={"image": image}, data={"k": "10"}).raise_for_status()  # noqa: E731
        timed(by_id, 5), timed(upload, 3)  # warm-up: index and backbone loaded by the server
        id_times = timed(by_id, queries)
        upload_times, embed_times = alternate(upload, backbone, image, queries)
    out = {"by_id": summary(id_times), "by_upload": summary(upload_times), "embed_alone": summary(embed_times)}
    out["upload_over_embed"] = round(out["by_upload"]["p50_ms"] / out["embed_alone"]["p50_ms"], 3)
    out["throughput_mixed_qps"] = round(run_clients(base, ids, image, mixed=True), 1)
    out["throughput_by_id_qps"] = round(run_clients(base, ids, image, mixed=False), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--quick", action="store_true", help="20k rows, 40 queries each")
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.queries = 20_000, 40
    from cytoretrieve.models.backbones import load_backbone

    info = _common.machine()
    _common.print_machine(info)
    backbone = load_backbone("resnet18", "random")
    image = next(iter(sorted((_common.HERLEV / "carcinoma_in_situ").iterdir()))).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        build_s = make_table(os.path.join(tmp, "store"), args.rows, backbone)
        print(f"table: {args.rows:,} rows x {backbone.dim}-d, ingest + index {build_s:.1f} s")
        server = _common.start_server(os.path.join(tmp, "store"), args.port)
        try:
            figures = measure(f"http://127.0.0.1:{args.port}", args.rows, args.queries, image, backbone)
        finally:
            server.terminate()
            server.wait(timeout=30)
    figures.update(rows=args.rows, queries=args.queries, build_s=round(build_s, 1))
    for key, value in figures.items():
        print(f"{key}: {value}")
    info["loadavg_end"] = _common.print_load("at the end")
    _common.write_json(args.json, {"machine": info, "figure": "viewer latency over HTTP", "results": figures})


if __name__ == "__main__":
    main()
