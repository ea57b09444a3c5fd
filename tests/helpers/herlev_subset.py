"""A small Herlev store for the viewer tests: the first `per_class` cells of each class (linked, not copied, from
../shared/data), embedded with the project's own `embed` by a seeded random resnet18 at 64 px (a few seconds)."""

from __future__ import annotations

from pathlib import Path

from cytoretrieve.jobs.embed import embed
from cytoretrieve.models.backbones import load_backbone
from cytoretrieve.store.tables import Store

from .paths import SVS

TABLE = "herlev_resnet18"


def link_subset(herlev_root: Path, dest: Path, per_class: int) -> Path:
    """`dest/herlev_derived_jpg/<class>/<cell>` symlinks to the first `per_class` cells of each class."""
    root = dest / herlev_root.name
    for folder in sorted(p for p in herlev_root.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True, exist_ok=True)
        for cell in sorted(folder.iterdir())[:per_class]:
            (root / folder.name / cell.name).symlink_to(cell)
    return root


def herlev_store(herlev_root: Path, tmp: Path, per_class: int = 12) -> Store:
    """A store holding TABLE: `per_class` cells of each of the 7 Herlev classes."""
    store = Store(tmp / "store")
    report = embed(link_subset(herlev_root, tmp / "cells", per_class), load_backbone("resnet18", "random", image_size=64),
                   store, batch_size=64, workers=0)
    assert report.table == TABLE and report.added == 7 * per_class and not report.failed
    return store


TILE_TABLE = "cmu_resnet18"


def add_tiles(store: Store) -> str:
    """Tile the real CMU-1-Small-Region slide (its overview is stored too) and embed its tiles into TILE_TABLE."""
    from cytoretrieve.cli import run

    assert run(["tile", str(SVS), "--store", store.uri, "--table", "cmu"]) == 0
    report = embed("cmu", load_backbone("resnet18", "random", image_size=64), store, table=TILE_TABLE, workers=0)
    assert report.table == TILE_TABLE and report.added > 10 and not report.failed
    return TILE_TABLE
