"""Deep Zoom geometry: which region of which slide level makes a tile of the viewer's zoomable picture.

The levels and tiles are those of OpenSlide's `DeepZoomGenerator` (openslide-python, `limit_bounds=False`), so
OpenSeadragon sees the same pyramid as in OpenSlide's own DeepZoom example: level 0 is 1 x 1 px, each level twice
the size of the one before (rounding up), the last one the slide's level 0; tiles of `tile_size` px (254) with
`overlap` px (1) shared with each neighbour; each Deep Zoom level is read from the slide level OpenSlide's
`get_best_level_for_downsample` would choose and resized (Lanczos) to the tile's size.

Pure arithmetic on the slide's level dimensions and downsamples: no slide library, no web framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

TILE_SIZE = 254
OVERLAP = 1
DZI_XMLNS = "http://schemas.microsoft.com/deepzoom/2008"


class OutsideSlide(ValueError):
    """A Deep Zoom level or tile address the slide does not have."""


@dataclass(frozen=True)
class TileRegion:
    """What to read for one tile: `size` px of slide `level` from level-0 (`x`, `y`), resized to `out` px;
    (`zx`, `zy`) is the tile's top-left in its Deep Zoom level's px (overlap included)."""

    x: int
    y: int
    level: int
    size: tuple[int, int]
    out: tuple[int, int]
    zx: int = 0
    zy: int = 0


def best_level(downsamples: tuple[float, ...], downsample: float) -> int:
    """The slide level to read a `downsample` view from, as `openslide_get_best_level_for_downsample`: the last
    level whose downsample is not above the wanted one (level 0 when even it is)."""
    if downsample < downsamples[0]:
        return 0
    for i in range(1, len(downsamples)):
        if downsample < downsamples[i]:
            return i - 1
    return len(downsamples) - 1


class DeepZoom:
    """The Deep Zoom pyramid of a slide with these level dimensions (level 0 first) and downsamples."""

    def __init__(self, level_dimensions: tuple[tuple[int, int], ...], level_downsamples: tuple[float, ...],
                 tile_size: int = TILE_SIZE, overlap: int = OVERLAP) -> None:
        if tile_size < 1 or overlap < 0:
            raise ValueError("the tile size must be positive and the overlap not negative")
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self.slide_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.slide_downsamples = tuple(float(d) for d in level_downsamples)
        size = self.slide_dimensions[0]
        sizes = [size]
        while size[0] > 1 or size[1] > 1:
            size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
            sizes.append(size)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(reversed(sizes))
        self.level_tiles = tuple((math.ceil(w / self.tile_size), math.ceil(h / self.tile_size))
                                 for w, h in self.level_dimensions)
        n = len(self.level_dimensions)
        self.level_count = n
        l0_downsamples = [2 ** (n - z - 1) for z in range(n)]
        self.slide_level = tuple(best_level(self.slide_downsamples, d) for d in l0_downsamples)
        self._l_from_z = tuple(l0_downsamples[z] / self.slide_downsamples[self.slide_level[z]] for z in range(n))

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[-1]

    @property
    def tile_count(self) -> int:
        return sum(c * r for c, r in self.level_tiles)

    def region(self, level: int, col: int, row: int) -> TileRegion:
        """The slide region behind tile (`col`, `row`) of Deep Zoom `level`; `OutsideSlide` when there is none."""
        if not 0 <= level < self.level_count:
            raise OutsideSlide(f"no Deep Zoom level {level} (the slide has 0-{self.level_count - 1})")
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise OutsideSlide(f"no tile {col}_{row} at level {level} (it has {cols} x {rows})")
        slide_level = self.slide_level[level]
        scale, l0_scale = self._l_from_z[level], self.slide_downsamples[slide_level]
        out, origin, size, z_origin = [], [], [], []
        for t, t_lim, z_lim, l_lim in zip((col, row), (cols, rows), self.level_dimensions[level],
                                          self.slide_dimensions[slide_level], strict=True):
            tl = self.overlap * int(t != 0)
            br = self.overlap * int(t != t_lim - 1)
            z_size = min(self.tile_size, z_lim - self.tile_size * t) + tl + br
            l_loc = scale * (self.tile_size * t - tl)
            out.append(z_size)
            z_origin.append(self.tile_size * t - tl)
            origin.append(int(l0_scale * l_loc))
            size.append(int(min(math.ceil(scale * z_size), l_lim - math.ceil(l_loc))))
        return TileRegion(origin[0], origin[1], slide_level, (size[0], size[1]), (out[0], out[1]), z_origin[0], z_origin[1])

    def base_level(self, max_side: int) -> int:
        """The largest Deep Zoom level whose whole picture fits `max_side` px a side: the levels up to it can be cut
        from that one picture instead of reading (and shrinking) most of the slide for every tile."""
        return max(z for z, (w, h) in enumerate(self.level_dimensions) if max(w, h) <= max_side)

    def whole_level(self, level: int) -> TileRegion:
        """The region behind the whole of Deep Zoom `level` (as if it were one tile)."""
        slide_level = self.slide_level[level]
        w, h = self.level_dimensions[level]
        lw, lh = self.slide_dimensions[slide_level]
        scale = self._l_from_z[level]
        return TileRegion(0, 0, slide_level, (min(math.ceil(scale * w), lw), min(math.ceil(scale * h), lh)), (w, h))

    def dzi(self, fmt: str = "jpeg", url: str | None = None) -> str:
        """The DZI description (XML) OpenSeadragon reads; `url`, when given, is where its tiles are
        (`{url}{level}/{col}_{row}.{fmt}`)."""
        w, h = self.dimensions
        where = f" Url={quoteattr(url)}" if url else ""
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_XMLNS}" Format="{fmt}" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}"{where}><Size Width="{w}" Height="{h}"/></Image>\n')
