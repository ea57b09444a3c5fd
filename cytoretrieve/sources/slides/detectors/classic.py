"""The default nucleus detector: image processing only, no weights, every threshold in physical units.

On a Pap smear a nucleus is a small, compact, roughly round spot clearly darker than the cytoplasm right around
it. What else is dark is not: a cytoplasm fold is long and thin, an overlap of two cells is large with soft edges,
debris is tiny or nearly black. So, on one image:

1. **darkness**: the image reduced to `work_mpp` when finer (each working pixel the mean of the pixels it
   covers; coarser images are used as they are), then its optical density against the glass (`darkness`; RGB
   and grey alike). At the default, 1 um/px, a nucleus of the smallest kept size (`min_area_um2`) still covers
   about ten pixels, and a tile has a quarter of the pixels it has at 0.5 um/px (see `ClassicSettings`);
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

from collections.abc import Callable
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
    `experiments/cervix93_detection.py`, at the working pixel size `work_mpp`; the candidate settings are set by
    the nucleus scale. `work_mpp` 1.0 (it was 0.5) makes the detector several times faster on a slide's tiles for
    a slightly lower test-field F1 (BENCHMARKS.md, "Cells"); 0.5 is still a setting."""

    work_mpp: float = 1.0
    background_um: float = 8.0
    sigma_um: float = 0.75
    min_separation_um: float = 2.0
    seed_min_od: float = 0.03
    region_fraction: float = 0.5
    ring_um: float = 1.5
    min_area_um2: float = 10.0
    max_area_um2: float = 100.0
    min_solidity: float = 0.8
    max_eccentricity: float = 0.93
    min_contrast_od: float = 0.08
    round_solidity: float = 0.92
    round_eccentricity: float = 0.8
    min_contrast_round_od: float = 0.07
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


def reduce_image(image: np.ndarray, mpp: float, work_mpp: float) -> tuple[np.ndarray, float]:
    """A uint8 image finer than `work_mpp` reduced to it before anything else (each working pixel the mean of the
    input pixels it covers: PIL's box filter, fast on uint8), with the scale applied (working px per input px);
    an image already as coarse, or one `darkness` refuses, is returned as it is, scale 1."""
    scale = mpp / work_mpp
    arr = np.asarray(image)
    if scale >= 1.0 or arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        return arr, 1.0
    from PIL import Image

    h, w = arr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., :3] if arr.ndim == 3 else arr))
                     .resize(size, Image.Resampling.BOX))
    return out, float(np.mean((size[1] / h, size[0] / w)))


def od_map(image: np.ndarray) -> np.ndarray:
    """`darkness(image)`, the same numbers, through a lookup table per channel (a logarithm per grey level, not
    per pixel); anything `darkness` refuses goes to it for its error."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        return darkness(arr)
    arr = arr[..., :3] if arr.ndim == 3 else arr[..., None]
    levels = np.maximum(np.arange(256, dtype=np.float32), 1.0)
    total = np.zeros(arr.shape[:2], dtype=np.float32)
    for c in range(arr.shape[2]):
        channel = arr[..., c]
        hist = np.bincount(channel.ravel(), minlength=256)
        glass = max(float(np.searchsorted(np.cumsum(hist), 0.98 * channel.size)), 1.0)
        total += np.log10(glass / levels)[channel]
    return np.clip(total / arr.shape[2], 0.0, None)


def seed_points(peaks: np.ndarray) -> np.ndarray:
    """(n, 2) int row, col of each connected group of peak pixels: its centre of mass, rounded (as
    `ndi.center_of_mass` gives it, by two bincounts)."""
    seeds, n = ndi.label(peaks)
    if n == 0:
        return np.zeros((0, 2), dtype=int)
    r, c = np.nonzero(seeds)
    lab = seeds[r, c]
    count = np.bincount(lab, minlength=n + 1)[1:]
    centres = np.c_[np.bincount(lab, r, minlength=n + 1)[1:] / count, np.bincount(lab, c, minlength=n + 1)[1:] / count]
    return np.round(centres).astype(int)


def _holes(fg: np.ndarray) -> np.ndarray:
    """`binary_fill_holes(fg) & ~fg` by one labelling of the background: the parts of it (4-connected, as
    `binary_fill_holes` floods) that do not reach the image border."""
    bg, n = ndi.label(~fg)
    if n == 0:
        return np.zeros(fg.shape, dtype=bool)
    outside = np.zeros(n + 1, dtype=bool)
    outside[0] = True
    outside[np.r_[bg[0], bg[-1], bg[:, 0], bg[:, -1]]] = True
    return ~outside[bg]


def _solidity_qhull(rows: np.ndarray, cols: np.ndarray) -> float:
    """`_solidity` by Qhull over every pixel's corners: the definition, kept for the tests."""
    if len(rows) < 3:
        return 1.0
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    pts = (np.c_[rows, cols][:, None, :] + corners[None]).reshape(-1, 2)
    try:
        return float(min(1.0, len(rows) / ConvexHull(pts).volume))
    except QhullError:
        return 1.0


def _solidity(rows: np.ndarray, cols: np.ndarray) -> float:
    """Pixel count over the area of the convex hull of the pixels' corners (a filled square gives 1). Only the
    outer corners of each row's first and last pixel can be hull vertices: their hull (a monotone chain over a
    few dozen points, in plain Python, where numpy's and Qhull's per-call costs would dominate) has the area
    Qhull gives over all corners (`_solidity_qhull`)."""
    n = len(rows)
    if n < 3:
        return 1.0
    ends: dict[int, list[int]] = {}
    for r, c in zip(np.asarray(rows).tolist(), np.asarray(cols).tolist(), strict=True):
        e = ends.get(r)
        if e is None:
            ends[r] = [c, c]
        elif c < e[0]:
            e[0] = c
        elif c > e[1]:
            e[1] = c
    pts = sorted({p for r, (lo, hi) in ends.items()
                  for p in ((r - 0.5, lo - 0.5), (r + 0.5, lo - 0.5), (r - 0.5, hi + 0.5), (r + 0.5, hi + 0.5))})
    hull: list[tuple[float, float]] = []
    for seq in (pts, pts[::-1]):  # lower, then upper chain
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2:
                (ox, oy), (ax, ay) = chain[-2], chain[-1]
                if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) > 0:
                    break
                chain.pop()
            chain.append(p)
        hull += chain[:-1]
    area = 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1], strict=True)))
    return float(min(1.0, n / area)) if area > 0 else 1.0


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


def _pieces(regions: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected pieces (4-neighbour) of equal non-zero value: (label image 1..n, n). One sparse-graph pass
    (`scipy.sparse.csgraph`), not one `ndi.label` per value."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    h, w = regions.shape
    flat = regions.ravel()
    nodes = np.flatnonzero(flat > 0)
    if len(nodes) == 0:
        return np.zeros((h, w), dtype=np.int32), 0
    node = np.full(h * w, -1, dtype=np.int64)
    node[nodes] = np.arange(len(nodes))
    r, c = np.nonzero((regions[:, :-1] == regions[:, 1:]) & (regions[:, :-1] > 0))
    right = r * w + c
    r, c = np.nonzero((regions[:-1] == regions[1:]) & (regions[:-1] > 0))
    down = r * w + c
    src = np.r_[right, down]
    dst = np.r_[right + 1, down + w]
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (node[src], node[dst])), shape=(len(nodes), len(nodes)))
    n, lab = connected_components(graph, directed=False)
    out = np.zeros(h * w, dtype=np.int32)
    out[nodes] = lab + 1
    return out.reshape(h, w), int(n)


def _touching(labels: np.ndarray) -> np.ndarray:
    """(m, 2) pairs of different non-zero labels that are 4-adjacent, both ways round."""
    out = [np.zeros((0, 2), labels.dtype)]
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        meet = (a != b) & (a > 0) & (b > 0)
        out += [np.c_[a[meet], b[meet]], np.c_[b[meet], a[meet]]]
    return np.unique(np.concatenate(out), axis=0)


def _fill_holes(labels: np.ndarray, holes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each region's holes filled with its label: the holes of the union of regions (`holes`, see `_holes`)
    whose 4-neighbours all belong to one region (exactly what `binary_fill_holes` of that region alone fills);
    and (m, 2) pairs of labels around a hole they share (one may enclose the other: the caller checks)."""
    none = np.zeros((0, 2), labels.dtype)
    if not holes.any():
        return labels, none
    hole_lab, n = ndi.label(holes)
    around = []
    for a, b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        for hs, ls in ((a, b), (b, a)):
            h, lab = hole_lab[hs], labels[ls]
            touch = (h > 0) & (lab > 0)
            around.append(np.c_[h[touch], lab[touch]])
    pairs = np.unique(np.concatenate(around), axis=0)  # (hole, label) pairs
    per_hole = np.bincount(pairs[:, 0], minlength=n + 1)
    single = np.zeros(n + 1, labels.dtype)
    one = per_hole[pairs[:, 0]] == 1
    single[pairs[one, 0]] = pairs[one, 1]
    out = labels.copy()
    out[holes] = single[hole_lab[holes]]
    shared = pairs[~one]
    if not len(shared):
        return out, none
    meet = []
    for hole in np.unique(shared[:, 0]):  # every two labels around one shared hole
        around_hole = shared[shared[:, 0] == hole, 1]
        a, b = np.meshgrid(around_hole, around_hole)
        meet.append(np.c_[a.ravel(), b.ravel()])
    both = np.concatenate(meet)
    return out, both[both[:, 0] != both[:, 1]].astype(labels.dtype)


def _enclosers(pairs: np.ndarray, boxes: list[Any], labels: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """The labels i of (i, j) pairs that may enclose j (so that `binary_fill_holes` of i alone covers j): j does
    not touch the glass that reaches the image border (not `holes`, not a region), and its bounding box lies
    strictly inside i's."""
    fg = labels > 0
    outside = ~fg & ~holes
    free = np.zeros(len(boxes) + 1, dtype=bool)
    free[labels[ndi.binary_dilation(outside) & fg]] = True
    out = set()
    for i, j in pairs[~free[pairs[:, 1]]] if len(pairs) else pairs:
        a, b = boxes[i - 1], boxes[j - 1]
        if a is None or b is None:
            continue
        if (a[0].start < b[0].start and b[0].stop < a[0].stop and a[1].start < b[1].start
                and b[1].stop < a[1].stop):
            out.add(int(i))
    return np.array(sorted(out), dtype=int)


def _ring_means(labels: np.ndarray, values: np.ndarray, n: int, ring_px: int, inside_sum: np.ndarray,
                inside_count: np.ndarray, block: int = 1 << 20,
                only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) of `values` over each region's ring: its `ring_px`-step dilation (a diamond, as
    `binary_dilation(iterations=ring_px)`) minus the region, neighbours' pixels included, for labels 1..n (with
    `only`, a mask over them, for those alone: the others' are meaningless). Every pixel near a region is
    gathered once per label that reaches it (in blocks), so rings may overlap."""
    if only is not None:
        labels = np.where(np.r_[False, np.asarray(only, dtype=bool)][labels], labels, 0)
    near = ndi.binary_dilation(labels > 0, iterations=ring_px)
    rr, cc = np.nonzero(near)
    offsets = [(dr, dc) for dr in range(-ring_px, ring_px + 1) for dc in range(-ring_px, ring_px + 1)
               if abs(dr) + abs(dc) <= ring_px]
    h, w = labels.shape
    total, count = np.zeros(n + 1), np.zeros(n + 1)
    for s in range(0, len(rr), block):
        r, c = rr[s : s + block], cc[s : s + block]
        reach = np.empty((len(offsets), len(r)), dtype=labels.dtype)
        for k, (dr, dc) in enumerate(offsets):  # the labels whose region lies within the diamond of each pixel
            r2, c2 = r - dr, c - dc
            ok = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
            reach[k] = np.where(ok, labels[np.clip(r2, 0, h - 1), np.clip(c2, 0, w - 1)], 0)
        reach.sort(axis=0)
        first = np.ones_like(reach, dtype=bool)
        first[1:] = reach[1:] != reach[:-1]
        use = first & (reach > 0)
        lab = reach[use]
        v = np.broadcast_to(values[r, c], reach.shape)[use]
        total += np.bincount(lab, v, minlength=n + 1)
        count += np.bincount(lab, minlength=n + 1)
    return total[1:] - inside_sum, count[1:] - inside_count


def _grow_regions(smooth_tophat: np.ndarray, seeds_rc: np.ndarray,
                  region_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Each seed's region: its watershed basin on the smoothed top-hat, cut at `region_fraction` of the seed's
    peak, keeping the connected piece that holds the seed; (label image 1..n, whether each seed kept a region)."""
    h, w = smooth_tophat.shape
    n = len(seeds_rc)
    markers = np.zeros((h, w), dtype=np.int32)
    markers[seeds_rc[:, 0], seeds_rc[:, 1]] = np.arange(1, n + 1)
    top = float(smooth_tophat.max())
    levels = np.clip((top - smooth_tophat) / max(top, 1e-6) * 65000.0, 0, 65000).astype(np.uint16)
    basins = ndi.watershed_ift(levels, markers)
    peaks = smooth_tophat[seeds_rc[:, 0], seeds_rc[:, 1]]
    inside = smooth_tophat >= region_fraction * peaks[np.maximum(basins, 1) - 1]
    regions = np.where(inside & (basins > 0), basins, 0).astype(np.int32)
    pieces, n_pieces = _pieces(regions)
    seed_piece = pieces[seeds_rc[:, 0], seeds_rc[:, 1]]
    ok = (regions[seeds_rc[:, 0], seeds_rc[:, 1]] == np.arange(1, n + 1)) & (seed_piece > 0)
    keep_piece = np.zeros(n_pieces + 1, dtype=bool)
    keep_piece[seed_piece[ok]] = True
    own = np.where(keep_piece[pieces], regions, 0).astype(np.int32)
    return own, ok


def _centres_and_eccentricity(per_label: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, cols: np.ndarray,
                              count: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean row, mean column and eccentricity of every region at once from per-label sums (`per_label` of the
    labelled pixels' values; `c` the pixel counts, NaN for invalid regions): second moments with np.cov's n - 1
    normalisation plus a pixel's own spread, as in `_eccentricity`."""
    mr, mc = per_label(rows) / c, per_label(cols) / c
    denom = np.where(count > 1, count - 1, np.nan)
    vrr = (per_label(rows * rows) - count * mr**2) / denom + 1 / 12
    vcc = (per_label(cols * cols) - count * mc**2) / denom + 1 / 12
    vrc = (per_label(rows * cols) - count * mr * mc) / denom
    half = np.sqrt(np.maximum(((vrr - vcc) / 2) ** 2 + vrc**2, 0.0))
    large, small = (vrr + vcc) / 2 + half, (vrr + vcc) / 2 - half
    ecc = np.sqrt(np.clip(1.0 - small / np.maximum(large, 1e-12), 0.0, None))
    return mr, mc, np.where(count < 3, 0.0, ecc)


def measure_regions(
    od: np.ndarray, smooth_tophat: np.ndarray, seeds_rc: np.ndarray, settings: ClassicSettings, work_px: float,
    solidity_where: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    measure_where: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Regions grown from seeds (row, col) on the smoothed top-hat (watershed, then `region_fraction` of each
    peak; the connected piece holding the seed, holes filled) and their measurements; (table in working px and
    um, label image). Used by both detectors.

    Every measurement but solidity is made for all regions at once (`np.bincount` over the label image); solidity
    (a convex hull each) only for the rows `solidity_where(table)` selects (default all; NaN elsewhere), so a
    detector computes it only for candidates the other rules have not already rejected; likewise the contrast
    to the ring around each region only for the rows `measure_where(table)` selects from the measurements
    before it (default all)."""
    h, w = od.shape
    seeds_rc = np.asarray(seeds_rc, dtype=int).reshape(-1, 2)
    n = len(seeds_rc)
    if n == 0:
        return {k: np.zeros(0) for k in CANDIDATE_FIELDS}, np.zeros((h, w), dtype=np.int32)
    own, ok = _grow_regions(smooth_tophat, seeds_rc, settings.region_fraction)
    holes = _holes(own > 0)
    labels, shared = _fill_holes(own, holes)
    boxes = ndi.find_objects(own, max_label=n)
    # a region that may enclose a neighbour (one it touches or shares a hole with) is measured alone (below), as
    # `binary_fill_holes` of it alone fills it: over the neighbour too
    alone = _enclosers(np.concatenate([_touching(own), shared]), boxes, own, holes)

    on = np.flatnonzero(labels)  # sums over the labelled pixels only, in the same order (the same sums)
    flat = labels.ravel()[on]
    count = np.bincount(flat, minlength=n + 1)[1:].astype(float)
    rows, cols = (on // w).astype(float), (on % w).astype(float)

    def per_label(values: np.ndarray) -> np.ndarray:  # values of the labelled pixels
        return np.bincount(flat, values, minlength=n + 1)[1:]

    def total(image: np.ndarray) -> np.ndarray:
        return per_label(image.ravel()[on].astype(float))

    valid = ok & (count > 0)
    c = np.where(valid, count, np.nan)
    mr, mc, ecc = _centres_and_eccentricity(per_label, rows, cols, count, c)
    od_smooth = ndi.gaussian_filter(od, settings.sigma_um / work_px)
    in_sum = total(od_smooth)
    ring_px = max(1, int(round(settings.ring_um / work_px)))
    nan = np.where(valid, 1.0, np.nan)
    out = {
        "x": mc * nan, "y": mr * nan, "area_um2": count * work_px**2 * nan, "solidity": np.full(n, np.nan),
        "eccentricity": ecc * nan, "contrast_od": np.full(n, np.nan), "tophat_od": total(smooth_tophat) / c,
        "darkness_od": total(od) / c,
    }
    filled: dict[int, tuple[tuple[slice, slice], np.ndarray]] = {}
    for lab in alone:
        i = lab - 1
        box = boxes[i]
        r0, r1 = max(0, box[0].start - ring_px), min(h, box[0].stop + ring_px)
        c0, c1 = max(0, box[1].start - ring_px), min(w, box[1].stop + ring_px)
        region = ndi.binary_fill_holes(own[r0:r1, c0:c1] == lab)
        window = (slice(r0, r1), slice(c0, c1))
        if np.array_equal(region, labels[window] == lab):  # encloses nothing: measured above already
            continue
        filled[i] = (window, region)
        rr, cc = np.nonzero(region)
        ring = ndi.binary_dilation(region, iterations=ring_px) & ~region
        inner = float(od_smooth[window][region].mean())
        out["x"][i], out["y"][i] = cc.mean() + c0, rr.mean() + r0
        out["area_um2"][i] = len(rr) * work_px**2
        out["eccentricity"][i] = _eccentricity(rr, cc)
        out["contrast_od"][i] = inner - (float(od_smooth[window][ring].mean()) if ring.any() else inner)
        out["tophat_od"][i] = float(smooth_tophat[window][region].mean())
        out["darkness_od"][i] = float(od[window][region].mean())
    ringed = valid.copy()  # the others' contrast: to the ring around each, all at once
    ringed[list(filled)] = False
    if measure_where is not None:
        ringed &= np.asarray(measure_where(out), dtype=bool)
    ring_sum, ring_count = _ring_means(labels, od_smooth, n, ring_px, in_sum, count, only=ringed)
    od_in = in_sum / c
    od_ring = np.where(ring_count > 0, ring_sum / np.maximum(ring_count, 1), od_in)
    out["contrast_od"][ringed] = (od_in - od_ring)[ringed]
    want = valid if solidity_where is None else valid & np.asarray(solidity_where(out), dtype=bool)
    for i in np.flatnonzero(want):
        if i in filled:
            out["solidity"][i] = _solidity(*np.nonzero(filled[i][1]))
        else:  # in the coordinates of the box grown by the ring, as above (the same rounding)
            box = boxes[i]
            r, cc = np.nonzero(labels[box] == i + 1)
            out["solidity"][i] = _solidity(r + min(ring_px, box[0].start), cc + min(ring_px, box[1].start))
    for i in sorted(filled):  # a pixel two filled regions cover keeps the lower label
        window, region = filled[i]
        view = labels[window]
        view[region] = np.where((view[region] == 0) | (view[region] > i + 1), i + 1, view[region])
    return out, labels


def candidates(image: np.ndarray, mpp: float, settings: ClassicSettings | None = None,
               prefilter: bool = False) -> Candidates:
    """Steps 1-4: every seed's region and measurements, positions in working pixels (see `Candidates`). With
    `prefilter`, the costly measurements are left NaN where the cheaper rules already reject the candidate: the
    contrast where `shape_ok` fails, solidity where `may_pass` fails. `select` gives the same answer, faster."""
    settings = settings or ClassicSettings()
    settings.validate()
    mpp = _check_mpp(mpp)
    reduced, scale = reduce_image(image, mpp, settings.work_mpp)
    od = od_map(reduced)
    work_px = mpp / scale
    smooth = ndi.gaussian_filter(_tophat(od, settings, work_px), settings.sigma_um / work_px)
    window = int(round(2 * settings.min_separation_um / work_px)) + 1
    peaks = (smooth == ndi.maximum_filter(smooth, size=window, mode="nearest")) & (smooth >= settings.seed_min_od)
    seeds_rc = seed_points(peaks)
    table, labels = measure_regions(od, smooth, seeds_rc, settings, work_px,
                                    solidity_where=(lambda t: may_pass(t, settings)) if prefilter else None,
                                    measure_where=(lambda t: shape_ok(t, settings)) if prefilter else None)
    valid = np.isfinite(table["x"])
    if not valid.all():
        table = {k: v[valid] for k, v in table.items()}
        remap = np.zeros(len(valid) + 1, dtype=np.int32)
        remap[1:][valid] = np.arange(1, int(valid.sum()) + 1)
        labels = remap[labels]
    return Candidates(table=table, labels=labels, od=od, scale=scale, mpp=mpp)


def shape_ok(table: dict[str, np.ndarray], settings: ClassicSettings) -> np.ndarray:
    """The rules of `select` that need neither solidity nor contrast: a candidate failing these is rejected
    whatever the ring around it holds, so its ring need not be gathered."""
    s = settings
    with np.errstate(invalid="ignore"):
        return (
            (table["area_um2"] >= s.min_area_um2)
            & (table["area_um2"] <= s.max_area_um2)
            & (table["eccentricity"] <= s.max_eccentricity)
            & (table["tophat_od"] >= s.min_tophat_od)
            & (table["tophat_od"] <= s.max_tophat_od)
            & (table["darkness_od"] <= s.max_darkness_od)
        )


def may_pass(table: dict[str, np.ndarray], settings: ClassicSettings) -> np.ndarray:
    """The rules of `select` that do not need solidity: a candidate failing these is rejected whatever its
    solidity, so its hull need not be measured."""
    s = settings
    with np.errstate(invalid="ignore"):
        return shape_ok(table, s) & (table["contrast_od"] >= min(s.min_contrast_od, s.min_contrast_round_od))


def select(table: dict[str, np.ndarray], settings: ClassicSettings) -> np.ndarray:
    """Step 5, the rules: a boolean mask over the candidates."""
    s = settings
    with np.errstate(invalid="ignore"):  # NaN solidity (not measured: rejected by `may_pass`) compares False
        return _rules(table, s)


def _rules(table: dict[str, np.ndarray], s: ClassicSettings) -> np.ndarray:
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
    on = nucleus_labels > 0
    piece_of = np.zeros(n + 1, dtype=np.int64)  # the piece each nucleus lies in (the largest id it touches)
    np.maximum.at(piece_of, nucleus_labels[on], pieces[on])
    piece_of = piece_of[1:]
    nuclei_per_piece = np.bincount(piece_of, minlength=count + 1)
    piece_area = np.bincount(pieces.ravel(), minlength=count + 1) * work_px**2
    nucleus_area = np.bincount(nucleus_labels.ravel(), minlength=n + 1)[1:] * work_px**2
    on_edge = np.zeros(count + 1, dtype=bool)
    on_edge[edge] = True
    ok = ((piece_of > 0) & (nucleus_area > 0) & (nuclei_per_piece[piece_of] == 1) & ~on_edge[piece_of]
          & (piece_area[piece_of] <= max_area_um2))
    cell_area[ok] = piece_area[piece_of[ok]]
    nc[ok] = nucleus_area[ok] / piece_area[piece_of[ok]]
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
        cands = candidates(image, mpp, self.params, prefilter=True)
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
