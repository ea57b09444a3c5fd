"""Reading slides of any format through the slide backends (`backends/`: OpenSlide, tifffile, plain images).

- `Slide` opens one file with errors a user can act on (missing file, not a slide, truncated TIFF) and knows the
  slide's level-0 pixel size (`mpp`, um/px): from the file's metadata, else from the user's `mpp=` or
  `objective=` (objective power P means 10 / P um/px: 20x = 0.5), else a `CytoError` that says what to pass.
- `choose_level` picks the level to read for a target mpp: the coarsest level that is still at least as fine as
  the target (within `MPP_TOLERANCE`), reading a larger region and resizing when no level matches.
- `SlideReader` is what DataLoader workers hold: picklable, it opens slides lazily in whichever process calls
  it (one handle per process, never shared across a fork), keeps at most `max_open` handles, and sizes the
  per-process cache of decoded tiles its backends share, so memory stays flat over hundreds of slides.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import slide_id
from cytoretrieve.sources.slides.backends import SlideBackend, SlideReadError, open_slide_file
from cytoretrieve.sources.slides.planes import PlaneSetting
from cytoretrieve.sources.slides.planes import read_region as read_planes_region

PLAUSIBLE_MPP = (0.05, 20.0)  # um/px a slide scanner can produce; other metadata values are ignored
MAX_UPSAMPLE = 4.0  # tiles are not made by enlarging a slide more than this
MPP_TOLERANCE = 0.02  # a level within 2% of the target mpp is read as is (scanners say 0.499 or 0.5025 for 20x)
DEFAULT_CACHE_BYTES = 64 << 20  # a reader's per-process cache of decoded tiles, shared by its open slides
DEFAULT_MAX_OPEN = 8  # slide handles a reader keeps open per process (least recently used are closed)
RESAMPLE = Image.Resampling.LANCZOS


def diagnose(path: str | Path) -> str:
    """A one-line reason why no slide backend can open `path`."""
    from cytoretrieve.sources.slides.backends.openslide import diagnose as why

    return why(Path(path))


def resolve_mpp(
    metadata: float | None | Mapping[str, str],
    mpp: float | None = None,
    objective: float | None = None,
    *,
    power: float | None = None,
    missing: str = "no pixel size in the slide metadata",
) -> tuple[float, str]:
    """Level-0 um/px and where it came from: the slide's own (`metadata`, a backend's `mpp`), else `mpp`, else
    10 / `objective`.

    A metadata value outside `PLAUSIBLE_MPP` counts as missing: generic TIFFs often carry a screen or print
    resolution (72 dpi = 352.8 um/px) that says nothing about the microscope. Raises `CytoError` when no value
    is available (`missing` says why), naming the objective `power` the slide reports, if any. A mapping is read
    as OpenSlide properties (`openslide.mpp-x`, `openslide.objective-power`).
    """
    if isinstance(metadata, Mapping):
        from cytoretrieve.sources.slides.backends.openslide import metadata as from_properties

        metadata, reported = from_properties(metadata)
        power = power or reported
    note = ""
    if metadata is not None:
        if PLAUSIBLE_MPP[0] <= metadata <= PLAUSIBLE_MPP[1]:
            return float(metadata), "slide"
        note = (f"implausible pixel size {metadata:g} um/px in the slide's metadata "
                f"(a scanner's is {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g})")
    if mpp is not None:
        if mpp <= 0:
            raise CytoError(f"`mpp` must be positive, not {mpp}")
        return float(mpp), "--mpp"
    if objective is not None:
        if objective <= 0:
            raise CytoError(f"`objective` must be positive, not {objective}")
        return 10.0 / float(objective), "--objective"
    hint = f" (it reports objective power {power:g}: `objective` {power:g} assumes {10 / power:g} um/px)" if power else ""
    raise CytoError(f"{note or missing}: pass `mpp` (um per level-0 pixel) or `objective` (20 for 20x = 0.5 um/px){hint}")


@dataclass(frozen=True)
class LevelChoice:
    """How to read one `tile_size` px tile at `target_mpp`: `read_size` px at `level`, resized when they differ.

    `extent` is the tile's side in level-0 px (the grid step when tiles do not overlap); `tile_mpp` the pixel
    size of the delivered tile (the target, or the level's own mpp when it is within tolerance of the target).
    """

    level: int
    downsample: float
    level_mpp: float
    read_size: int
    tile_size: int
    extent: int
    tile_mpp: float

    @property
    def resized(self) -> bool:
        return self.read_size != self.tile_size

    def scaled(self, size: int) -> tuple[int, int]:
        """(read_size, extent) for a tile of `size` output px at the same level and scale (cell crops)."""
        read = max(1, round(size * self.read_size / self.tile_size))
        return read, max(1, round(read * self.downsample))


def choose_level(
    downsamples: tuple[float, ...] | list[float],
    mpp: float,
    target_mpp: float,
    tile_size: int,
    tolerance: float = MPP_TOLERANCE,
) -> LevelChoice:
    """The level to read `tile_size` px tiles at `target_mpp` from, for a slide of level-0 pixel size `mpp`.

    The coarsest level whose mpp is at most the target (within `tolerance`): no detail is invented, and no more
    pixels are decoded than needed. When the slide is coarser than the target even at level 0, level 0 is read
    and upsampled (at most `MAX_UPSAMPLE` times, else `CytoError`).
    """
    if target_mpp <= 0 or tile_size <= 0:
        raise CytoError("the target mpp and the tile size must be positive")
    level_mpps = [mpp * d for d in downsamples]
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + tolerance)]
    level = max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0
    scale = target_mpp / level_mpps[level]  # level px per output px
    if scale < 1 / MAX_UPSAMPLE:
        raise CytoError(f"the slide is {level_mpps[level]:.3g} um/px at its finest level: tiles at {target_mpp:g} um/px "
                        f"would enlarge it {1 / scale:.1f}x (at most {MAX_UPSAMPLE:g}x)")
    if abs(scale - 1) <= tolerance:
        read_size, tile_mpp = tile_size, level_mpps[level]
    else:
        read_size, tile_mpp = max(1, round(tile_size * scale)), target_mpp
    extent = max(1, round(read_size * downsamples[level]))
    return LevelChoice(level, float(downsamples[level]), level_mpps[level], read_size, tile_size, extent, tile_mpp)


@dataclass(frozen=True)
class SlideInfo:
    """What the tiling job needs to know about a slide."""

    path: str
    id: str
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float  # level-0 um/px
    mpp_source: str  # "slide", "--mpp" or "--objective"
    objective: float | None
    bounds: tuple[int, int, int, int]  # (x, y, width, height) of the scanned area in level-0 px
    background: str  # hex RGB of the area outside the scan
    backend: str = "openslide"  # the slide backend that reads it (`backends.BACKENDS`)
    planes: int = 1  # focal planes
    grey: bool = False  # grey-level pixels, delivered as RGB

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Slide:
    """One open slide: its backend (`backend`) and its `SlideInfo`. Use as a context manager, or `close()` it.

    `backend` names a registered slide backend, or "auto" to choose by extension and content; `cache_bytes`
    sizes the per-process cache of decoded tiles (None: the backend's default).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        mpp: float | None = None,
        objective: float | None = None,
        backend: str = "auto",
        cache_bytes: int | None = None,
    ) -> None:
        path = Path(path)
        self.backend: SlideBackend = open_slide_file(path, backend, cache_bytes=cache_bytes)
        b = self.backend
        try:
            bx, by, bw, bh = (int(v) for v in b.bounds)
            level_mpp, source = resolve_mpp(b.mpp, mpp, objective, power=b.objective, missing=b.no_mpp)
            self.info = SlideInfo(
                path=str(path.absolute()),
                id=slide_id(path),
                vendor=b.vendor,
                dimensions=(int(b.dimensions[0]), int(b.dimensions[1])),
                level_dimensions=tuple((int(w), int(h)) for w, h in b.level_dimensions),
                level_downsamples=tuple(float(d) for d in b.level_downsamples),
                mpp=level_mpp,
                mpp_source=source,
                objective=b.objective or (objective if source == "--objective" else None),
                bounds=(bx, by, bw, bh),
                background=b.background,
                backend=b.name,
                planes=int(b.planes),
                grey=bool(b.grey),
            )
        except BaseException:
            b.close()
            raise

    @property
    def handle(self) -> SlideBackend:
        """The open backend (the name of the OpenSlide handle this used to be)."""
        return self.backend

    def choose_level(self, target_mpp: float, tile_size: int) -> LevelChoice:
        return choose_level(self.info.level_downsamples, self.info.mpp, target_mpp, tile_size)

    def read_rgb(self, x: int, y: int, level: int, size: tuple[int, int], *, plane: int = 0) -> Image.Image:
        """An RGB region: `size` px of `level` (focal plane `plane`), its top-left at level-0 (`x`, `y`). Read
        errors propagate (`SlideReadError` for damaged image data)."""
        return self.backend.read_region(int(x), int(y), int(level), (int(size[0]), int(size[1])), plane=plane)

    def read_tile(self, x: int, y: int, level: int, read_size: int, tile_size: int, *,
                  plane: PlaneSetting = None) -> Image.Image:
        """A `tile_size` px RGB tile: `read_size` px read at `level` from level-0 (`x`, `y`), resized if needed;
        `plane`: a focal plane setting (`planes.py`: None, N, best, edf)."""
        return self.read_tile_plane(x, y, level, read_size, tile_size, plane=plane)[0]

    def read_tile_plane(self, x: int, y: int, level: int, read_size: int, tile_size: int, *,
                        plane: PlaneSetting = None) -> tuple[Image.Image, int]:
        """`read_tile`, and the plane the tile came from (`planes.EDF` for a composite)."""
        im, used = read_planes_region(self.backend, int(x), int(y), int(level), (int(read_size), int(read_size)), plane)
        return (im if read_size == tile_size else im.resize((tile_size, tile_size), RESAMPLE)), used

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlideReader:
    """Reads tiles of many slides; give one to a DataLoader dataset and every worker reads with its own handles.

    Picklable: only its settings travel. Handles (slide backends, chosen as `Slide` chooses them) open lazily in
    the process that reads, at most `max_open` at a time (least recently used closed first), sharing one
    per-process cache of decoded tiles of `cache_bytes`. A forked child never reuses its parent's handles.
    `mpp` / `objective` are not needed to read: tile rows carry the level and read size.

        reader = SlideReader()
        image = reader.read_tile(row["path"], row["x"], row["y"], row["level"], row["read_size"], row["tile_size"])
        image = reader.read_row(row)   # the same, from a tile-table row dict
    """

    def __init__(self, cache_bytes: int = DEFAULT_CACHE_BYTES, max_open: int = DEFAULT_MAX_OPEN) -> None:
        self.cache_bytes = int(cache_bytes)
        self.max_open = max(1, int(max_open))
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._handles: OrderedDict[str, SlideBackend] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_bytes": self.cache_bytes, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cache_bytes = state["cache_bytes"]
        self.max_open = state["max_open"]
        self._reset()

    def handle(self, path: str | Path) -> SlideBackend:
        """The open backend of `path` in this process (opened on first use)."""
        if os.getpid() != self._pid:  # forked: the parent's handles belong to the parent
            self._reset()
        key = str(path)
        found = self._handles.get(key)
        if found is not None:
            self._handles.move_to_end(key)
            return found
        try:
            found = open_slide_file(key, cache_bytes=self.cache_bytes)
        except CytoError as e:
            raise CytoError(f"{key}: {e}") from None
        self._handles[key] = found
        while len(self._handles) > self.max_open:
            _, old = self._handles.popitem(last=False)
            old.close()
        return found

    def read_tile(
        self, path: str | Path, x: int, y: int, level: int, read_size: int, tile_size: int, *,
        plane: PlaneSetting = None,
    ) -> Image.Image:
        """A `tile_size` px RGB tile: `read_size` px at `level` from level-0 (`x`, `y`) of `path`, resized if needed.

        Damaged image data (a corrupt tile inside a slide) raises `SlideReadError`; after one, the handle is
        dropped so the next read reopens the slide.
        """
        backend = self.handle(path)
        try:
            im = read_planes_region(backend, int(x), int(y), int(level), (int(read_size), int(read_size)), plane)[0]
        except SlideReadError:
            self.discard(path)  # an OpenSlide handle in error state fails every later read
            raise
        return im if read_size == tile_size else im.resize((int(tile_size), int(tile_size)), RESAMPLE)

    def read_row(self, row: Mapping[str, Any], plane: PlaneSetting = None) -> Image.Image:
        """`read_tile` from a tile-table row (`path`, `x`, `y`, `level`, `read_size`, `tile_size`, and `plane`
        where the table has it: the plane the row was read from, `planes.EDF` for a composite); `plane` given
        here overrides the row's."""
        chosen = row.get("plane") if plane is None else plane
        return self.read_tile(row["path"], row["x"], row["y"], row["level"], row["read_size"], row["tile_size"],
                              plane=chosen)

    def discard(self, path: str | Path) -> None:
        found = self._handles.pop(str(path), None)
        if found is not None:
            found.close()

    def close(self) -> None:
        """Close every handle this process opened."""
        if os.getpid() == self._pid:
            for found in self._handles.values():
                found.close()
        self._reset()

    @property
    def open_count(self) -> int:
        return len(self._handles) if os.getpid() == self._pid else 0
