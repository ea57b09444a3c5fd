"""Cell-deposit detection and the tile grid, checked exactly on a synthetic slide of known geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.sources.slides.deposit import DepositParams, deposit_mask, detect_deposit, otsu_threshold
from cytoretrieve.sources.slides.grid import GridSpec, make_grid
from cytoretrieve.sources.slides.reader import Slide
from cytoretrieve.sources.slides.rules import RULES
from helpers.synthetic_slides import FULL_TILES, HALF_TILE, MASK_AREA_MM2, slide_folder


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    return slide_folder(tmp_path_factory.getbasetemp() / "slides")


@pytest.fixture(scope="module")
def standard(slides):
    with Slide(slides["standard"]) as s:
        return s.info, deposit_mask(s)


def coverage_grid(path: Path, spec: GridSpec):
    """The grid the coverage rule keeps, the level chosen once as the tiler does."""
    with Slide(path) as s:
        grid = make_grid(s.info, spec, s.choose_level(spec.target_mpp, spec.tile_size))
        return RULES["coverage"].apply(s, grid, spec, DepositParams(), None).grid


def test_otsu_splits_two_populations() -> None:
    values = np.concatenate([np.full(100, 30), np.full(50, 200)]).astype(np.uint8)
    t = otsu_threshold(values)
    assert 30 <= t < 200
    assert otsu_threshold(np.full(10, 7, np.uint8)) == 7  # one level: nothing above it


def test_mask_area_is_exact(standard) -> None:
    info, mask = standard
    assert mask.downsample == 16 and mask.mpp == pytest.approx(4.0)  # level 3 read as is
    assert mask.mask.shape == (240, 320)
    # block A minus the large hole plus block B; the small hole is filled, specks and the blob removed
    assert mask.area_mm2 == pytest.approx(MASK_AREA_MM2, abs=1e-12)


def test_grey_method_finds_the_same_deposit(slides) -> None:
    with Slide(slides["standard"]) as s:
        assert deposit_mask(s, DepositParams(method="grey")).area_mm2 == pytest.approx(MASK_AREA_MM2, abs=1e-12)


def test_blank_glass_has_no_deposit(slides) -> None:
    with Slide(slides["empty"]) as s:
        assert not deposit_mask(s).mask.any()


def test_specks_and_small_holes(standard) -> None:
    rgb = np.full((60, 60, 3), 236, np.uint8)
    rgb[10:50, 10:50] = (150, 80, 160)
    rgb[20:24, 20:24] = 236  # hole of 16 px: filled
    rgb[2:4, 2:4] = (150, 80, 160)  # speck: gone
    mask, _ = detect_deposit(rgb, 4.0)
    assert mask.sum() == 40 * 40
    assert mask[10:50, 10:50].all()


def test_grid_keeps_tiles_by_coverage(slides) -> None:
    grid = coverage_grid(slides["standard"], GridSpec())
    assert (grid.choice.level, grid.choice.read_size, grid.choice.extent) == (1, 320, 640)
    assert grid.xs.size == 8 * 6
    kept = {(x, y): c for x, y, c in grid.tiles()}
    assert set(kept) == FULL_TILES | {HALF_TILE}
    assert all(kept[t] == 1.0 for t in FULL_TILES) and kept[HALF_TILE] == 0.5
    assert coverage_grid(slides["standard"], GridSpec(min_coverage=0.6)).n_kept == 11
    assert coverage_grid(slides["standard"], GridSpec(min_coverage=0.0)).n_kept == 48


def test_grid_stride_and_target_mpp(slides) -> None:
    half = coverage_grid(slides["standard"], GridSpec(stride=160))  # 50% overlap
    assert half.stride == 320 and half.xs.size == 15 * 11
    assert {(x, y) for x, y, c in half.tiles() if c == 1.0} >= FULL_TILES
    coarse = coverage_grid(slides["standard"], GridSpec(target_mpp=1.0))  # 10x: level 2, 1280 level-0 px per tile
    assert (coarse.choice.level, coarse.choice.extent, coarse.xs.size) == (2, 1280, 4 * 3)
    fine = coverage_grid(slides["standard"], GridSpec(target_mpp=0.4, tile_size=256))  # no level: level 0, resized
    assert (fine.choice.level, fine.choice.read_size, fine.choice.extent) == (0, 410, 410)
