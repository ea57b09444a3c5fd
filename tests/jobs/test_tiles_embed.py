"""Slides through the spine: tile a real slide, embed its tile table, search tiles; and jobs sharded by torchrun."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cytoretrieve.cli import run
from cytoretrieve.distributed import shard
from cytoretrieve.jobs.embed import embed
from cytoretrieve.models.backbones import load_backbone
from cytoretrieve.queries.search import search
from cytoretrieve.store.tables import Store
from helpers.paths import SVS


@pytest.fixture(scope="module")
def tiled_store(tmp_path_factory) -> Store:
    if not SVS.exists():
        pytest.skip(f"{SVS} not found")
    store = Store(tmp_path_factory.mktemp("tiles"))
    assert run(["tile", str(SVS), "--store", store.uri, "--table", "bag"]) == 0
    return store


def test_embed_tile_table_then_search_returns_slide_coordinates(tiled_store: Store) -> None:
    backbone = load_backbone("resnet18", "random", image_size=64)
    tiles = tiled_store.db.open_table("bag").to_arrow().to_pylist()
    report = embed("bag", backbone, tiled_store, workers=0)
    assert report.table == "bag_resnet18" and report.added == len(tiles) > 0 and not report.failed
    assert embed("bag", backbone, tiled_store, workers=0).added == 0  # resumable: a rerun adds nothing

    table = tiled_store.open("bag_resnet18")
    stored = {r["id"]: r for r in table.read(["id", "slide", "x", "y", "level", "tile_size", "mpp", "thumbnail"]).to_pylist()}
    for tile in tiles:  # every vector row keeps its tile's slide location
        row = stored[tile["id"]]
        assert (row["slide"], row["x"], row["y"], row["level"]) == (tile["slide"], tile["x"], tile["y"], tile["level"])
        assert row["thumbnail"][:2] == b"\xff\xd8"
    query = tiles[0]["id"]
    result = search(table, row_id=query, k=5)
    assert len(result.hits) == 5 and query not in {h.id for h in result.hits}
    assert all(h.slide == "CMU-1-Small-Region" and h.x is not None and h.y is not None for h in result.hits)


def test_shards_partition_the_items(monkeypatch) -> None:
    items = [f"slide{i}" for i in range(50)]
    parts = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        parts.append(shard(items, str))
    assert sorted(sum(parts, [])) == sorted(items) and all(parts)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert shard(items, str) == items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_processes_embed_one_table(tmp_path: Path) -> None:
    from cytoretrieve.sources.cells.synthetic import make_cells

    cells = make_cells(tmp_path / "cells", per_class=4, size=48)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cytoretrieve", "embed", str(cells), "--label-map",
           str(cells / "label_map.json"), "--backbone", "resnet18", "--weights", "random", "--image-size", "48",
           "--workers", "0", "--store", str(store), "--table", "cells"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    added = [int(line.split(":")[1].split()[0]) for line in done.stdout.splitlines() if line.startswith("table cells:")]
    assert len(added) == 2 and all(n > 0 for n in added) and sum(added) == 28  # both processes wrote their share
    ids = Store(store).open("cells").read(["id"]).column("id").to_pylist()
    assert len(ids) == 28 and len(set(ids)) == 28


def test_embed_a_slide_directly_tiles_it_first(tmp_path: Path) -> None:
    if not SVS.exists():
        pytest.skip(f"{SVS} not found")
    store = Store(tmp_path / "s")
    report = embed(SVS, load_backbone("resnet18", "random", image_size=48), store, workers=0)
    assert report.table == "cmu_1_small_region_tiles_resnet18"
    assert report.added == store.db.open_table("cmu_1_small_region_tiles").count_rows() > 0
    # one tiler, one set of defaults: `embed SLIDE` tiles exactly as `cytoretrieve tile SLIDE` does
    from cytoretrieve.store.tiles import open_tile_table

    assert run(["tile", str(SVS), "--store", store.uri, "--table", "by_tile"]) == 0
    by_embed, by_tile = open_tile_table(store, "cmu_1_small_region_tiles"), open_tile_table(store, "by_tile")
    settings = [{k: v for k, v in t.meta.items() if k != "created"} for t in (by_embed, by_tile)]
    assert settings[0] == settings[1] and settings[0]
    assert sorted(r["x"] * 100003 + r["y"] for r in by_embed.rows(["x", "y"])) == \
        sorted(r["x"] * 100003 + r["y"] for r in by_tile.rows(["x", "y"]))


def test_two_torchrun_processes_tile_their_share_of_slides(tmp_path: Path) -> None:
    if not SVS.exists():
        pytest.skip(f"{SVS} not found")
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(4):
        (slides / f"slide{i}.svs").symlink_to(SVS)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cytoretrieve", "tile", str(slides), "--store", str(store)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = Store(store).db.open_table("tiles").to_arrow()
    ids = rows.column("id").to_pylist()
    assert len(ids) == len(set(ids))  # no slide tiled twice
    assert set(rows.column("slide").to_pylist()) == {f"slide{i}" for i in range(4)}
