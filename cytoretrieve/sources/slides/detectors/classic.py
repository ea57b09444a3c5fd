"""The default nucleus detector: image processing only, no weights, every threshold in physical units.

On a Pap smear a nucleus is a small, compact, roughly round spot clearly darker than the cytoplasm right around
it. What else is dark is not: a cytoplasm fold is long and thin, an overlap of two cells is large with soft edges,
debris is tiny or nearly black. So, on one image:

1. **darkness**: optical density against the glass (`darkness`; RGB and grey alike), resampled to `work_mpp`
   (finer images are smoothed and reduced, coarser ones used as they are);
2. **background removal**: a grey opening with a square of half-side `background_um` (larger than a nucleus) is
   the local level of the cytoplasm under and around it; subtracting it leaves what is darker than its
   surroundings at the nucleus scale (a white top-hat), so large overlaps and dark clusters of cytoplasm vanish;
3. **seeds**: the top-hat smoothed with a Gaussian of `sigma_um`, its local maxima at least `min_separation_um`
   apart and at least `seed_min_od` high;
4. **regions**: a watershed of the smoothed top-hat from all seeds splits touching nuclei; each seed keeps the
   connected part of its basin at least `region_fraction` of its peak, holes filled;
5. **rules** (the measurements of each region): area in [`min_area_um2`, `max_area_um2`], solidity at least
   `min_solidity` (area over convex-hull area: folds and ragged debris are concave), eccentricity at most
   `max_eccentricity` (folds are elongated), contrast to a ring `ring_um` wide around it at least
   `min_contrast_od` (mean optical density inside minus in the ring: overlaps and folds have soft edges; a
   candidate at least `round_solidity` solid and at most `round_eccentricity` eccentric, the shape of a nucleus
   and of little else, needs only `min_contrast_round_od`: pale nuclei are round too), mean
   top-hat in [`min_tophat_od`, `max_tophat_od`] and mean optical density at most `max_darkness_od` (nearly black
   debris and pigment are darker than any stained nucleus).

`confidence` is contrast / (contrast + `min_contrast_od`): 0.5 at the contrast threshold, towards 1 above it.
The cell around each nucleus (`cell_area_um2`, `nc_ratio`) is measured where it can be told apart: the cytoplasm
foreground (darkness at least `cell_min_od`) split by a watershed from the nuclei; a cell counts only when it is
the only nucleus in its piece of foreground and does not touch the image edge (overlapping cells cannot be
separated by brightness alone), NaN otherwise.

`candidates` (steps 1-4 with every measurement) and `select` (step 5) are public so that the rules can be tuned
on annotated fields from one pass of candidates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from cytoretrieve.sources.slides.detectors import Nuclei, darkness

CANDIDATE_FIELDS = ("x", "y", "area_um2", "solidity", "eccentricity", "contrast_od", "tophat_od", "darkness_od")


@dataclass(frozen=True)
class ClassicSettings:
    """Settings of the classic detector: lengths in um, areas in um^2, darkness in optical density (log10).

    The rule thresholds are those chosen on the 69 Cervix93 training fields (at an assumed 0.25 um/px) by
    `experiments/cervix93_detection.py`; the candidate settings are set by the nucleus scale."""

    work_mpp: float = 0.5
    background_um: float = 8.0
    sigma_um: float = 0.75
    min_separation_um: float = 2.0
    seed_min_od: float = 0.03
    region_fraction: float = 0.5
    ring_um: float = 1.5
    min_area_um2: float = 8.0
    max_area_um2: float = 100.0
    min_solidity: float = 0.8
    max_eccentricity: float = 0.95
    min_contrast_od: float = 0.08
    round_solidity: float = 0.9
    round_eccentricity: float = 0.8
    min_contrast_round_od: float = 0.06
    min_tophat_od: float = 0.12
    max_tophat_od: float = 1.0
    max_darkness_od: float = 1.1
    cell_min_od: float = 0.05
    cell_max_area_um2: float = 6000.0

    def validate(self) -> None:
        for name in ("work_mpp", "background_um", "sigma_um", "min_separation_um", "ring_um"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, not {getattr(self, name)}")
        if not 0 < self.region_fraction < 1:
            raise ValueError(f"`region_fraction` must be in (0, 1), not {self.region_fraction}")
        if self.min_area_um2 > self.max_area_um2:
            raise ValueError("`min_area_um2` must not exceed `max_area_um2`")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_mpp(mpp: float) -> float:
    mpp = float(mpp)
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp must be a positive number of um per pixel, not {mpp}")
    return mpp


def to_working(od: np.ndarray, mpp: float, work_mpp: float) -> tuple[np.ndarray, float]:
    """`od` resampled to `work_mpp` when finer (smoothed first, so nothing aliases), with the scale applied
    (working px per input px); an image already as coarse is returned as it is, scale 1."""
    scale = mpp / work_mpp
    if scale >= 1.0:
        return od, 1.0
    smooth = ndi.gaussian_filter(od, 0.4 / scale)
    shape = (max(1, round(od.shape[0] * scale)), max(1, round(od.shape[1] * scale)))
    zoom = (shape[0] / od.shape[0], shape[1] / od.shape[1])
    return ndi.zoom(smooth, zoom, order=1, grid_mode=True, mode="nearest"), float(np.mean(zoom))


def _solidity(rows: np.ndarray, cols: np.ndarray) -> float:
    """Pixel count over the area of the convex hull of the pixels' corners (a filled square gives 1)."""
    if len(rows) < 3:
        return 1.0
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    pts = (np.c_[rows, cols][:, None, :] + corners[None]).reshape(-1, 2)
    try:
        return float(min(1.0, len(rows) / ConvexHull(pts).volume))
    except QhullError:
        return 1.0


def _eccentricity(rows: np.ndarray, cols: np.ndarray) -> float:
    """Eccentricity of the ellipse with the region's second moments (0 a disc, towards 1 a line)."""
    if len(rows) < 3:
        return 0.0
    cov = np.cov(np.c_[rows, cols].T.astype(float)) + np.eye(2) / 12.0  # a pixel's own spread
    small, large = np.linalg.eigvalsh(cov)
    return float(np.sqrt(max(0.0, 1.0 - small / max(large, 1e-12))))


@dataclass
class Candidates:
    """Nucleus candidates of one image with their measurements (arrays, one entry each), before the rules;
    `labels` is the working-resolution region image (candidate i is i + 1), `od` the working darkness map."""

    table: dict[str, np.ndarray]
    labels: np.ndarray
    od: np.ndarray
    scale: float
    mpp: float

    def __len__(self) -> int:
        return len(self.table["x"])


def _tophat(od: np.ndarray, settings: ClassicSettings, work_px: float) -> np.ndarray:
    side = int(round(2 * settings.background_um / work_px)) + 1
    return od - ndi.grey_opening(od, size=(side, side), mode="reflect")


def measure_regions(
    od: np.ndarray, smooth_tophat: np.ndarray, seeds_rc: np.ndarray, settings: ClassicSettings, work_px: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Regions grown from seeds (row, col) on the smoothed top-hat (watershed, then `region_fraction` of each
    peak) and their measurements; (table in working px and um, label image). Used by both detectors."""
    h, w = od.shape
    markers = np.zeros((h, w), dtype=np.int32)
    seeds_rc = np.asarray(seeds_rc, dtype=int).reshape(-1, 2)
    markers[seeds_rc[:, 0], seeds_rc[:, 1]] = np.arange(1, len(seeds_rc) + 1)
    empty = {k: np.zeros(0) for k in CANDIDATE_FIELDS}
    if len(seeds_rc) == 0:
        return empty, markers
    top = float(smooth_tophat.max())
    levels = np.clip((top - smooth_tophat) / max(top, 1e-6) * 65000.0, 0, 65000).astype(np.uint16)
    basins = ndi.watershed_ift(levels, markers)
    peaks = smooth_tophat[seeds_rc[:, 0], seeds_rc[:, 1]]
    inside = smooth_tophat >= settings.region_fraction * peaks[np.maximum(basins, 1) - 1]
    regions = np.where(inside & (basins > 0), basins, 0).astype(np.int32)
    od_smooth = ndi.gaussian_filter(od, settings.sigma_um / work_px)
    ring_px = max(1, int(round(settings.ring_um / work_px)))
    out = {k: np.full(len(seeds_rc), np.nan) for k in CANDIDATE_FIELDS}
    labels = np.zeros((h, w), dtype=np.int32)
    for i, box in enumerate(ndi.find_objects(regions, max_label=len(seeds_rc))):
        if box is None:
            continue
        r0, r1 = max(0, box[0].start - ring_px), min(h, box[0].stop + ring_px)
        c0, c1 = max(0, box[1].start - ring_px), min(w, box[1].stop + ring_px)
        pieces, _ = ndi.label(regions[r0:r1, c0:c1] == i + 1)
        own = pieces[seeds_rc[i, 0] - r0, seeds_rc[i, 1] - c0]
        if own == 0:
            continue
        region = ndi.binary_fill_holes(pieces == own)
        rows, cols = np.nonzero(region)
        ring = ndi.binary_dilation(region, iterations=ring_px) & ~region
        od_in = float(od_smooth[r0:r1, c0:c1][region].mean())
        od_ring = float(od_smooth[r0:r1, c0:c1][ring].mean()) if ring.any() else od_in
        out["x"][i], out["y"][i] = cols.mean() + c0, rows.mean() + r0
        out["area_um2"][i] = len(rows) * work_px**2
        out["solidity"][i] = _solidity(rows, cols)
        out["eccentricity"][i] = _eccentricity(rows, cols)
        out["contrast_od"][i] = od_in - od_ring
        out["tophat_od"][i] = float(smooth_tophat[r0:r1, c0:c1][region].mean())
        out["darkness_od"][i] = float(od[r0:r1, c0:c1][region].mean())
        view = labels[r0:r1, c0:c1]
        view[region & (view == 0)] = i + 1
    return out, labels


def candidates(image: np.ndarray, mpp: float, settings: ClassicSettings | None = None) -> Candidates:
    """Steps 1-4: every seed's region and measurements, positions in working pixels (see `Candidates`)."""
    settings = settings or ClassicSettings()
    settings.validate()
    mpp = _check_mpp(mpp)
    od, scale = to_working(darkness(image), mpp, settings.work_mpp)
    work_px = mpp / scale
    smooth = ndi.gaussian_filter(_tophat(od, settings, work_px), settings.sigma_um / work_px)
    window = int(round(2 * settings.min_separation_um / work_px)) + 1
    peaks = (smooth == ndi.maximum_filter(smooth, size=window, mode="nearest")) & (smooth >= settings.seed_min_od)
    seeds, n = ndi.label(peaks)
    centres = ndi.center_of_mass(peaks, seeds, np.arange(1, n + 1)) if n else []
    seeds_rc = np.round(np.asarray(centres, dtype=float).reshape(-1, 2)).astype(int)
    table, labels = measure_regions(od, smooth, seeds_rc, settings, work_px)
    valid = np.isfinite(table["x"])
    if not valid.all():
        table = {k: v[valid] for k, v in table.items()}
        remap = np.zeros(len(valid) + 1, dtype=np.int32)
        remap[1:][valid] = np.arange(1, int(valid.sum()) + 1)
        labels = remap[labels]
    return Candidates(table=table, labels=labels, od=od, scale=scale, mpp=mpp)


def select(table: dict[str, np.ndarray], settings: ClassicSettings) -> np.ndarray:
    """Step 5, the rules: a boolean mask over the candidates."""
    s = settings
    return (
        (table["area_um2"] >= s.min_area_um2)
        & (table["area_um2"] <= s.max_area_um2)
        & (table["solidity"] >= s.min_solidity)
        & (table["eccentricity"] <= s.max_eccentricity)
        & (
            (table["contrast_od"] >= s.min_contrast_od)
            | (
                (table["contrast_od"] >= s.min_contrast_round_od)
                & (table["solidity"] >= s.round_solidity)
                & (table["eccentricity"] <= s.round_eccentricity)
            )
        )
        & (table["tophat_od"] >= s.min_tophat_od)
        & (table["tophat_od"] <= s.max_tophat_od)
        & (table["darkness_od"] <= s.max_darkness_od)
    )


def cell_measures(
    od: np.ndarray, nucleus_labels: np.ndarray, n: int, work_px: float, min_od: float, max_area_um2: float
) -> tuple[np.ndarray, np.ndarray]:
    """(cell area um^2, nucleus area / cell area) per nucleus label 1..n; NaN where the cell cannot be separated:
    more than one nucleus in its piece of foreground, the piece touches the image edge or is too large, or the
    nucleus has no pixels of its own."""
    cell_area, nc = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0:
        return cell_area, nc
    fg = ndi.binary_opening(ndi.gaussian_filter(od, 1.0 / work_px) >= min_od, iterations=1) | (nucleus_labels > 0)
    pieces, count = ndi.label(fg)
    edge = np.unique(np.r_[pieces[0], pieces[-1], pieces[:, 0], pieces[:, -1]])
    index = np.arange(1, n + 1)
    piece_of = ndi.maximum(pieces, nucleus_labels, index).astype(int)
    nuclei_per_piece = np.bincount(piece_of, minlength=count + 1)
    piece_area = np.bincount(pieces.ravel(), minlength=count + 1) * work_px**2
    nucleus_area = np.bincount(nucleus_labels.ravel(), minlength=n + 1)[1:] * work_px**2
    for i, p in enumerate(piece_of):
        if p > 0 and nucleus_area[i] > 0 and nuclei_per_piece[p] == 1 and p not in edge and piece_area[p] <= max_area_um2:
            cell_area[i] = piece_area[p]
            nc[i] = nucleus_area[i] / piece_area[p]
    return cell_area, nc


class ClassicDetector:
    """The default detector (no weights); `ClassicDetector(min_contrast_od=0.1)` overrides one setting."""

    name = "classic"

    def __init__(self, settings: ClassicSettings | None = None, **overrides: Any) -> None:
        known = {f.name for f in fields(ClassicSettings)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown classic detector settings: {sorted(unknown)}")
        self.params = replace(settings or ClassicSettings(), **overrides)
        self.params.validate()
        self.settings: dict[str, Any] = {"detector": self.name, **self.params.to_dict()}

    def __call__(self, image: np.ndarray, mpp: float) -> Nuclei:
        cands = candidates(image, mpp, self.params)
        keep = select(cands.table, self.params)
        return nuclei_from(cands, keep, self.params)


def nuclei_from(cands: Candidates, keep: np.ndarray, settings: ClassicSettings, confidence: np.ndarray | None = None) -> Nuclei:
    """The kept candidates as `Nuclei` in input pixels, with their cells measured; `confidence` defaults to the
    contrast score."""
    idx = np.flatnonzero(keep)
    t = {k: v[idx] for k, v in cands.table.items()}
    remap = np.zeros(len(keep) + 1, dtype=np.int32)
    remap[idx + 1] = np.arange(1, len(idx) + 1)
    labels = remap[cands.labels]
    work_px = cands.mpp / cands.scale
    cell_area, nc = cell_measures(cands.od, labels, len(idx), work_px, settings.cell_min_od, settings.cell_max_area_um2)
    if confidence is None:
        contrast = np.clip(t["contrast_od"], 0, None)
        confidence = contrast / (contrast + settings.min_contrast_od)
    else:
        confidence = np.asarray(confidence, dtype=float)[idx]
    return Nuclei(
        x=(t["x"] + 0.5) / cands.scale - 0.5,
        y=(t["y"] + 0.5) / cands.scale - 0.5,
        area_um2=t["area_um2"],
        darkness=t["darkness_od"],
        confidence=np.clip(confidence, 0.0, 1.0),
        cell_area_um2=cell_area,
        nc_ratio=nc,
        mpp=cands.mpp,
        labels=labels,
        labels_mpp=work_px,
    )
