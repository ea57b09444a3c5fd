"""The tile grid: `tile_size` px tiles at `target_mpp` (320 px at 0.5 um/px = 20x by default) on a regular grid
over the scanned area, without overlap unless `stride` < `tile_size`, and which tile rule decides what is kept
(`rules.py`: `cells` for cytology, the default; `coverage` for tissue).

Positions are level-0 pixels. Only whole tiles are placed: the grid starts at the scan's top-left corner and
stops before a tile would cross its right or bottom edge. The read level is chosen once per slide, by the caller
(`Slide.choose_level`), and passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.reader import LevelChoice, SlideInfo

DEFAULT_RULE = "cells"


@dataclass(frozen=True)
class GridSpec:
    """Tile size (output px), target pixel size (um/px), stride (output px; default the tile size), the tile rule
    and its threshold: `min_foreground_um2` of cell foreground per tile (`cells`) or `min_coverage`, the fraction
    of a tile in the deposit (`coverage`)."""

    tile_size: int = 320
    target_mpp: float = 0.5
    stride: int | None = None
    rule: str = DEFAULT_RULE
    min_foreground_um2: float = 100.0
    min_coverage: float = 0.05  # tissue: a tile with 5% tissue is kept, so thin strands and edges are too

    @property
    def step(self) -> int:
        return self.stride or self.tile_size

    def validate(self) -> None:
        """The grid's own settings; the rule's name is checked by the rules registry (`rules.rule_params`)."""
        if self.tile_size < 8:
            raise CytoError(f"`tile_size` must be at least 8 px, not {self.tile_size}")
        if self.target_mpp <= 0:
            raise CytoError(f"`target_mpp` must be positive, not {self.target_mpp}")
        if self.stride is not None and self.stride < 1:
            raise CytoError(f"`stride` must be at least 1 px, not {self.stride}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise CytoError(f"`min_coverage` must be between 0 and 1, not {self.min_coverage}")
        if self.min_foreground_um2 < 0:
            raise CytoError(f"`min_foreground_um2` must be at least 0 um^2, not {self.min_foreground_um2}")

    def to_dict(self) -> dict[str, float | int | str]:
        """The settings a tile table records: the grid's and the rule's own threshold. A `coverage` table has no
        `rule` key, as tables made before the rules existed: they stay appendable."""
        out: dict[str, float | int | str] = {"tile_size": self.tile_size, "target_mpp": self.target_mpp,
                                             "stride": self.step}
        if self.rule == "coverage":
            return {**out, "min_coverage": self.min_coverage}
        return {**out, "rule": self.rule, "min_foreground_um2": self.min_foreground_um2}


@dataclass
class Grid:
    """Every grid position of a slide (level-0 top-left corners) and what the rule found there: `coverage`, the
    fraction of the tile in the deposit (`coverage` rule) or covered by cell foreground (`cells`); `in_region`,
    whether it touches the deposit region; `kept`."""

    choice: LevelChoice
    stride: int  # level-0 px between neighbouring tiles
    xs: np.ndarray  # int64, all positions
    ys: np.ndarray
    coverage: np.ndarray  # float64 in [0, 1]
    in_region: np.ndarray  # bool
    kept: np.ndarray  # bool
    foreground_um2: np.ndarray | None = None  # cells rule: cell foreground per tile
    focus: np.ndarray | None = None  # focus score per tile (NaN: not scored, or too little stain); see tiling
    plane: np.ndarray | None = None  # focal plane each tile was read from (-1: EDF composite)
    blurred: np.ndarray | None = None  # bool: tiles the rule kept whose focus is under the blur threshold

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def n_region(self) -> int:
        return int(self.in_region.sum())

    def tiles(self) -> list[tuple[int, int, float]]:
        """(x, y, coverage) of the kept tiles, row by row."""
        return [(int(x), int(y), float(c)) for x, y, c in
                zip(self.xs[self.kept], self.ys[self.kept], self.coverage[self.kept])]


def positions(start: int, length: int, extent: int, stride: int) -> np.ndarray:
    """Top-left coordinates of whole tiles of `extent` every `stride` in [start, start + length)."""
    if extent > length:
        return np.zeros(0, np.int64)
    return np.arange(start, start + length - extent + 1, stride, dtype=np.int64)


def make_grid(info: SlideInfo, spec: GridSpec, choice: LevelChoice) -> Grid:
    """The grid of a slide read as `choice` says, every tile kept (coverage 1) until a rule decides."""
    spec.validate()
    stride = max(1, round(spec.step * choice.read_size / spec.tile_size * choice.downsample))
    if spec.step == spec.tile_size:
        stride = choice.extent  # exactly edge to edge
    bx, by, bw, bh = info.bounds
    gx = positions(bx, bw, choice.extent, stride)
    gy = positions(by, bh, choice.extent, stride)
    ys, xs = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
    ones = np.ones(xs.size, bool)
    return Grid(choice=choice, stride=stride, xs=xs, ys=ys, coverage=np.ones(xs.size), in_region=ones, kept=ones.copy())
