"""The slide viewer's tile route under load: 8 clients panning over two slides through `cytoretrieve serve` (a
separate process, real HTTP on loopback only), and a search issued meanwhile.

The store holds the real CMU-1-Small-Region (Aperio SVS, one level) and a synthetic smear
(`synthetic_smears.write_smear`, 6400 x 6400 px pyramidal TIFF at 0.5 um/px), both tiled, plus a vector table of
`--rows` clustered vectors (`serve_latency.make_table`) to search. Each client pans over its own band of one slide
(clients 0-3 the SVS, 4-7 the smear): a serpentine walk over the Deep Zoom tiles of the two finest levels, at most
`--tiles` requests, one at a time (bounded loops; nothing random). Figures:
- cold: the first request of every tile in a fresh server (slide handles opened, regions read for the first time);
- warm: the same walks again (the slide open, the region read before);
  targets p50 <= 100 ms cold, <= 20 ms warm, 0 errors;
- search: p50 of GET /api/tables/T/search?id=...&k=10 issued one after another, idle (before the load) and while
  the 8 clients pan (cold phase, then warm phase); target: under load <= 2x idle.

    nice .venv/bin/python benchmarks/tile_route.py --quick      # 2k rows, 24 tiles per client
    nice .venv/bin/python benchmarks/tile_route.py              # 20k rows, 60 tiles per client
    nice .venv/bin/python benchmarks/tile_route.py --quick --nice 0,10 --rounds 3   # A/B of the tile threads' nice

`--nice` compares servers whose tile threads run that many nice steps below the rest (`CYTORETRIEVE_TILE_NICE`),
one fresh server per value and round, the values alternating in each round (a busy machine's drift falls on
both); the figures are then medians over the rounds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common
from serve_latency import TABLE, make_table

ROOT = Path(__file__).resolve().parents[1]
SVS = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
CLIENTS = 8


def build_store(tmp: Path, rows: int) -> str:
    """A store with both slides tiled and a vector table of `rows` rows."""
    from cytoretrieve.cli import run
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.sources.slides.synthetic_smears import write_smear

    store = str(tmp / "store")
    smear = write_smear(tmp / "smear.tiff", "medium", deposit_mm=2.5)
    for path in (SVS, smear.path):
        if run(["tile", str(path), "--store", store, "--table", "slides"]) != 0:
            raise RuntimeError(f"tiling {path} failed")
    make_table(store, rows, load_backbone("resnet18", "random", image_size=224))
    return store


def walks(base: str, tiles: int) -> list[list[str]]:
    """Per client, the tile URLs of its serpentine pan over its band of its slide's two finest Deep Zoom levels."""
    import httpx

    out = []
    infos = {s: httpx.get(f"{base}/api/slides/{s}", timeout=60).json() for s in ("CMU-1-Small-Region", "smear")}
    for c in range(CLIENTS):
        info = infos["CMU-1-Small-Region" if c < CLIENTS // 2 else "smear"]
        band = c % (CLIENTS // 2)
        urls: list[str] = []
        for level in (info["levels"] - 1, info["levels"] - 2):
            scale = 2 ** (info["levels"] - 1 - level)
            cols = math.ceil(math.ceil(info["width"] / scale) / info["tile_size"])
            rows = math.ceil(math.ceil(info["height"] / scale) / info["tile_size"])
            per = max(1, math.ceil(rows / (CLIENTS // 2)))
            for r in range(band * per, min(rows, (band + 1) * per)):
                order = range(cols) if r % 2 == 0 else range(cols - 1, -1, -1)
                urls += [f"{info['tiles']}{level}/{col}_{r}.jpeg" for col in order]
        out.append(urls[:tiles])
    return out


def pan(base: str, plan: list[list[str]]) -> tuple[list[float], int]:
    """Every client's walk at once; (seconds per tile, errors)."""
    import httpx

    def client(urls: list[str]) -> tuple[list[float], int]:
        times, errors = [], 0
        with httpx.Client(base_url=base, timeout=120) as http:
            for url in urls:
                t0 = time.perf_counter()
                r = http.get(url)
                times.append(time.perf_counter() - t0)
                errors += r.status_code != 200 or r.headers.get("content-type") != "image/jpeg"
        return times, errors

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(client, plan))
    return [t for ts, _ in results for t in ts], sum(e for _, e in results)


def searches(base: str, ids: list[str], stop: threading.Event | None, n: int) -> list[float]:
    """Searches by id one after another: `n` of them, or until `stop` is set (at least 5)."""
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=120) as http:
        i = 0
        while (len(out) < n) if stop is None else (not stop.is_set() or len(out) < 5):
            t0 = time.perf_counter()
            r = http.get(f"/api/tables/{TABLE}/search", params={"id": ids[i % len(ids)], "k": 10})
            out.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"search failed: {r.status_code} {r.text[:200]}")
            i += 1
            if len(out) >= 10_000:
                break
    return out


def under_load(base: str, plan: list[list[str]], ids: list[str]) -> tuple[list[float], int, list[float]]:
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        found = pool.submit(searches, base, ids, stop, 0)
        time.sleep(0.05)
        tiles, errors = pan(base, plan)
        stop.set()
        return tiles, errors, found.result()


def ms(seconds: list[float]) -> dict[str, float]:
    return {"n": len(seconds), "p50_ms": round(_common.percentile(seconds, 50) * 1e3, 1),
            "p95_ms": round(_common.percentile(seconds, 95) * 1e3, 1)}


def measure(store: str, port: int, rows: int, tiles: int, n_searches: int) -> dict:
    """One fresh server: idle searches, then the cold and the warm pan with searches meanwhile."""
    import httpx

    proc = _common.start_server(store, port)
    base = f"http://127.0.0.1:{port}"  # loopback only
    try:
        ids = [f"c{i:07d}" for i in range(0, rows, max(1, rows // 200))]
        searches(base, ids, None, 5)  # warm-up: the index loaded
        idle = searches(base, ids, None, n_searches)
        plan = walks(base, tiles)  # /api/slides/{slide}: opens both slides (as the page does first)
        cold, cold_errors, during_cold = under_load(base, plan, ids)
        warm, warm_errors, during_warm = under_load(base, plan, ids)
        traversal = httpx.get(f"{base}/api/slides/..%2F..%2Fetc%2Fpasswd/tiles/0/0_0.jpeg").status_code
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"cold": ms(cold), "cold_errors": cold_errors, "warm": ms(warm), "warm_errors": warm_errors,
            "search_idle": ms(idle), "search_during_cold": ms(during_cold), "search_during_warm": ms(during_warm),
            "traversal_status": traversal, "requests": (len(cold), len(warm))}


def report(label: str, runs: list[dict]) -> dict:
    """Medians over `runs` (one per round) of each figure, printed; the search ratios are per run, then medians."""
    import statistics

    def med(key: str, stat: str) -> float:
        return round(statistics.median(r[key][stat] for r in runs), 1)

    out = {k: {s: med(k, s) for s in ("p50_ms", "p95_ms")} for k in ("cold", "warm", "search_idle",
                                                                        "search_during_cold", "search_during_warm")}
    for phase in ("cold", "warm"):
        out[f"ratio_{phase}"] = round(statistics.median(r[f"search_during_{phase}"]["p50_ms"] / r["search_idle"]["p50_ms"]
                                                        for r in runs), 2)
    out["errors"] = sum(r["cold_errors"] + r["warm_errors"] for r in runs)
    out["traversal_status"] = sorted({r["traversal_status"] for r in runs})
    print(f"[{label}] tiles cold p50 {out['cold']['p50_ms']} ms, p95 {out['cold']['p95_ms']} ms (target p50 <= 100 ms); "
          f"warm p50 {out['warm']['p50_ms']} ms, p95 {out['warm']['p95_ms']} ms (target p50 <= 20 ms); "
          f"{out['errors']} errors; traversal HTTP {out['traversal_status']}")
    print(f"[{label}] search idle p50 {out['search_idle']['p50_ms']} ms; during the cold pan {out['ratio_cold']}x, "
          f"during the warm pan {out['ratio_warm']}x its idle p50 (target <= 2x; medians of {len(runs)} run(s))")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="vectors in the searched table")
    parser.add_argument("--tiles", type=int, default=60, help="tile requests per client and phase")
    parser.add_argument("--searches", type=int, default=60, help="idle searches timed")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--quick", action="store_true", help="2k rows, 24 tiles per client, 30 idle searches")
    parser.add_argument("--nice", default=None, help="comma-separated nice steps of the tile threads to compare "
                        "(CYTORETRIEVE_TILE_NICE; default: the server's own)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh servers per --nice value, alternating")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.tiles, args.searches = 2_000, 24, 30
    if not SVS.exists():
        sys.exit(f"{SVS} not found")
    arms = [v.strip() for v in args.nice.split(",")] if args.nice else [None]
    _common.print_machine(_common.machine())
    start_load = _common.print_load("at start")
    runs: dict[str, list[dict]] = {str(a): [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build_store(Path(tmp), args.rows)
        print(f"store built in {time.perf_counter() - t0:.1f} s ({args.rows:,} rows, 2 slides tiled)")
        for r in range(args.rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                if arm is not None:
                    os.environ["CYTORETRIEVE_TILE_NICE"] = arm
                runs[str(arm)].append(measure(store, args.port, args.rows, args.tiles, args.searches))
                print(f"round {r + 1}, nice {arm if arm is not None else 'default'}: done", flush=True)
    results = {"tiles_per_client": args.tiles, "clients": CLIENTS, "rows": args.rows, "rounds": args.rounds,
               "load_start": start_load, "arms": {}}
    for arm, got in runs.items():
        results["arms"][arm] = {**report(f"nice {arm if arm != 'None' else 'default'}", got), "runs": got}
    results["load_end"] = _common.print_load("at end")
    _common.write_json(args.json, results)


if __name__ == "__main__":
    main()
