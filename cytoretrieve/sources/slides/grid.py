"""The tile grid: `tile_size` px tiles at `target_mpp` (320 px at 0.5 um/px = 20x by default) on a regular grid
over the scanned area, without overlap unless `stride` < `tile_size`; a tile is kept when at least
`min_coverage` of its area is cell deposit.

Positions are level-0 pixels. Only whole tiles are placed: the grid starts at the scan's top-left corner and
stops before a tile would cross its right or bottom edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.deposit import DepositMask
from cytoretrieve.sources.slides.reader import LevelChoice, SlideInfo, choose_level


@dataclass(frozen=True)
class GridSpec:
    """Tile size (output px), target pixel size (um/px), stride (output px; default the tile size) and the mask
    coverage a tile needs to be kept."""

    tile_size: int = 320
    target_mpp: float = 0.5
    stride: int | None = None
    min_coverage: float = 0.5

    @property
    def step(self) -> int:
        return self.stride or self.tile_size

    def validate(self) -> None:
        if self.tile_size < 8:
            raise CytoError(f"`tile_size` must be at least 8 px, not {self.tile_size}")
        if self.target_mpp <= 0:
            raise CytoError(f"`target_mpp` must be positive, not {self.target_mpp}")
        if self.stride is not None and self.stride < 1:
            raise CytoError(f"`stride` must be at least 1 px, not {self.stride}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise CytoError(f"`min_coverage` must be between 0 and 1, not {self.min_coverage}")

    def to_dict(self) -> dict[str, float | int]:
        return {"tile_size": self.tile_size, "target_mpp": self.target_mpp, "stride": self.step,
                "min_coverage": self.min_coverage}


@dataclass
class Grid:
    """Every grid position of a slide (level-0 top-left corners), its deposit coverage, and which are kept."""

    choice: LevelChoice
    stride: int  # level-0 px between neighbouring tiles
    xs: np.ndarray  # int64, all positions
    ys: np.ndarray
    coverage: np.ndarray  # float64 in [0, 1]
    kept: np.ndarray  # bool

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    def tiles(self) -> list[tuple[int, int, float]]:
        """(x, y, coverage) of the kept tiles, row by row."""
        return [(int(x), int(y), float(c)) for x, y, c in
                zip(self.xs[self.kept], self.ys[self.kept], self.coverage[self.kept])]


def positions(start: int, length: int, extent: int, stride: int) -> np.ndarray:
    """Top-left coordinates of whole tiles of `extent` every `stride` in [start, start + length)."""
    if extent > length:
        return np.zeros(0, np.int64)
    return np.arange(start, start + length - extent + 1, stride, dtype=np.int64)


def make_grid(info: SlideInfo, spec: GridSpec, mask: DepositMask | None) -> Grid:
    """The grid of a slide; with no mask every tile is kept (coverage 1)."""
    spec.validate()
    choice = choose_level(info.level_downsamples, info.mpp, spec.target_mpp, spec.tile_size)
    stride = max(1, round(spec.step * choice.read_size / spec.tile_size * choice.downsample))
    if spec.step == spec.tile_size:
        stride = choice.extent  # exactly edge to edge
    bx, by, bw, bh = info.bounds
    gx = positions(bx, bw, choice.extent, stride)
    gy = positions(by, bh, choice.extent, stride)
    ys, xs = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
    if mask is None:
        coverage = np.ones(xs.size)
    else:
        coverage = mask.coverage(xs, ys, choice.extent)
    kept = coverage >= spec.min_coverage - 1e-9
    return Grid(choice=choice, stride=stride, xs=xs, ys=ys, coverage=coverage, kept=kept)
