"""Nucleus detectors: the classic detector on drawn fields (grey and RGB, rejections, physical units), Hungarian
matching counts, a tiny point-trained detector (train, save, load, same output), the registry, and a floor for
the default detector on two real Cervix93 training fields."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.sources.slides.detectors import (
    DETECTORS,
    Nuclei,
    darkness,
    get_detector,
    register_detector,
)
from cytoretrieve.sources.slides.detectors.classic import ClassicDetector
from cytoretrieve.sources.slides.detectors.evaluate import count, f1, match_points, precision, recall

CERVIX93 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cervix93"

NUCLEI_UM = [(30.0, 30.0), (70.0, 35.0), (45.0, 80.0), (95.0, 85.0)]  # disc centres, um
NUCLEUS_RADIUS_UM = 3.5
SPECK_UM = (100.0, 20.0)
FOLD_UM = ((20.0, 110.0), (110.0, 112.0))  # a long faint line across the field


def draw_field(mpp: float, size_um: float = 130.0, rgb: bool = False) -> np.ndarray:
    """A smear-like field at `mpp`: glass, one broad sheet of pale cytoplasm, dark nuclei, a tiny black speck and a
    long faint fold; same scene in um at any mpp."""
    n = int(round(size_um / mpp))
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * mpp
    grey = np.full((n, n), 235.0)
    grey[(xx > 10) & (xx < 120) & (yy > 10) & (yy < 120)] = 200.0  # cytoplasm sheet
    for cx, cy in NUCLEI_UM:
        grey[np.hypot(xx - cx, yy - cy) <= NUCLEUS_RADIUS_UM] = 95.0
    grey[np.hypot(xx - SPECK_UM[0], yy - SPECK_UM[1]) <= 0.5] = 10.0
    (x0, y0), (x1, y1) = FOLD_UM
    t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
    grey[np.hypot(xx - (x0 + t * (x1 - x0)), yy - (y0 + t * (y1 - y0))) <= 0.8] = 160.0
    rng = np.random.default_rng(0)
    grey = np.clip(grey + rng.normal(0, 2.0, grey.shape), 0, 255).astype(np.uint8)
    if not rgb:
        return grey
    tint = np.array([0.85, 0.9, 1.0])  # bluish: red absorbed most
    return np.clip(255.0 * (grey[..., None] / 255.0) ** (1 / tint), 0, 255).astype(np.uint8)


def truth_px(mpp: float) -> np.ndarray:
    return np.array(NUCLEI_UM) / mpp - 0.5


def test_darkness_zero_on_glass_and_positive_on_stain() -> None:
    od = darkness(draw_field(0.5))
    assert od.shape == (260, 260) and od.dtype == np.float32
    assert np.median(od[:8, :8]) < 0.02  # glass
    assert od[int(30 / 0.5), int(30 / 0.5)] > 0.3  # nucleus
    with pytest.raises(ValueError):
        darkness(np.zeros((4, 4), dtype=np.float32))


@pytest.mark.parametrize("rgb", [False, True])
def test_classic_finds_drawn_nuclei_and_rejects_speck_and_fold(rgb: bool) -> None:
    mpp = 0.25
    found = ClassicDetector()(draw_field(mpp, rgb=rgb), mpp)
    assert isinstance(found, Nuclei)
    radius = NUCLEUS_RADIUS_UM / mpp
    assert match_points(found.xy, truth_px(mpp), radius) == (len(NUCLEI_UM), 0, 0)
    # nothing near the speck or along the fold
    speck = np.array(SPECK_UM) / mpp
    assert np.all(np.hypot(*(found.xy - speck).T) > radius)
    assert np.all(found.y < 100 / mpp)
    true_area = np.pi * NUCLEUS_RADIUS_UM**2
    assert np.all(np.abs(found.area_um2 - true_area) < 0.5 * true_area)
    assert np.all((found.confidence > 0.5) & (found.confidence <= 1))
    assert np.all(found.darkness > 0.2)


def test_classic_areas_are_physical_across_resolutions() -> None:
    fine = ClassicDetector()(draw_field(0.25), 0.25)
    coarse = ClassicDetector()(draw_field(0.5), 0.5)
    assert len(fine) == len(coarse) == len(NUCLEI_UM)
    assert np.allclose(np.sort(fine.area_um2), np.sort(coarse.area_um2), rtol=0.3)
    true_area = np.pi * NUCLEUS_RADIUS_UM**2
    assert np.allclose(fine.area_um2, true_area, rtol=0.35) and np.allclose(coarse.area_um2, true_area, rtol=0.35)
    # the same pixels said to be twice as coarse: four times the area in um^2
    doubled = ClassicDetector(max_area_um2=1000)(draw_field(0.25), 0.5)
    assert len(doubled) >= 1 and np.median(doubled.area_um2) > 3 * np.median(fine.area_um2)


def test_cell_measures_nan_where_cells_overlap() -> None:
    found = ClassicDetector()(draw_field(0.5), 0.5)
    # all four nuclei share one cytoplasm sheet: no cell can be told apart
    assert np.all(np.isnan(found.cell_area_um2)) and np.all(np.isnan(found.nc_ratio))
    lone = np.full((200, 200), 235, dtype=np.uint8)
    yy, xx = np.mgrid[0:200, 0:200]
    lone[np.hypot(xx - 100, yy - 100) <= 40] = 200  # a cell 40 px = 20 um across at 0.5 um/px
    lone[np.hypot(xx - 100, yy - 100) <= 7] = 95
    one = ClassicDetector()(lone, 0.5)
    assert len(one) == 1
    assert one.cell_area_um2[0] == pytest.approx(np.pi * 20**2, rel=0.15)
    assert one.nc_ratio[0] == pytest.approx(one.area_um2[0] / one.cell_area_um2[0])


def test_matching_counts_hand_made_case() -> None:
    truth = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]])
    # two detections on the first nucleus, one on the second just inside the radius, one far from everything
    dets = np.array([[11.0, 10.0], [9.0, 11.0], [54.0, 50.0], [200.0, 200.0]])
    assert match_points(dets, truth, radius_px=5.0) == (2, 2, 1)
    assert match_points(dets, truth, radius_px=3.0) == (1, 3, 2)
    # one detection between two points: one match only
    assert match_points(np.array([[30.0, 30.0]]), np.array([[28.0, 30.0], [32.0, 30.0]]), 5.0) == (1, 0, 1)
    # the assignment maximises matches: a greedy nearest pairing would find only one here
    assert match_points(np.array([[0.0, 0.0], [4.0, 0.0]]), np.array([[3.0, 0.0], [-3.0, 0.0]]), 3.5) == (2, 0, 0)
    assert match_points(np.zeros((0, 2)), truth, 5.0) == (0, 0, 3)
    assert match_points(dets, np.zeros((0, 2)), 5.0) == (0, 4, 0)
    c = count(dets, truth, 5.0) + count(np.zeros((0, 2)), truth, 5.0)
    assert (c.tp, c.fp, c.fn) == (2, 2, 4)
    assert precision(2, 2) == 0.5 and recall(2, 4) == pytest.approx(1 / 3) and f1(2, 2, 4) == pytest.approx(0.4)


def test_point_detector_trains_saves_loads_same_predictions(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cytoretrieve.sources.slides.detectors.learned import load, train_point_detector

    torch.set_num_threads(1)
    mpp = 0.5
    image = draw_field(mpp)
    samples = [(image, truth_px(mpp), mpp)]
    kwargs = dict(steps=4, batch=2, patch_px=64, widths=(4, 8, 8), seed=3, tune_threshold=False, threshold=0.3)
    detector = train_point_detector(samples, names=["drawn"], **kwargs)
    again = train_point_detector(samples, names=["drawn"], **kwargs)
    od = darkness(image)
    assert np.array_equal(detector.heat_map(od), again.heat_map(od))  # seeded: same weights

    path = detector.save(tmp_path / "points.pt")
    loaded = get_detector(path)
    assert loaded.settings == detector.settings
    assert loaded.record["names"] == ["drawn"] and loaded.record["points"] == len(NUCLEI_UM)
    assert "torch" in loaded.record["versions"]
    np.testing.assert_array_equal(loaded.heat_map(od), detector.heat_map(od))
    a, b = detector(image, mpp), loaded(image, mpp)
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.confidence, b.confidence)
    assert load(path, threshold=0.9).params.threshold == 0.9
    with pytest.raises(ValueError):
        load(path, no_such_setting=1)


def test_point_detector_options_deeper_net_contrast_channel_bce_flips(tmp_path: Path) -> None:
    """Four levels, a local-contrast second channel, cross-entropy and averaged flips: trains, keeps its settings
    through a file, and the flip-averaged map is symmetric under a flip of the field."""
    torch = pytest.importorskip("torch")
    from cytoretrieve.sources.slides.detectors.learned import HeatNet, PointSettings, load, train_point_detector

    torch.set_num_threads(1)
    mpp = 0.5
    image = draw_field(mpp)
    kwargs = dict(steps=3, batch=2, patch_px=64, widths=(4, 8, 8, 8), seed=1, tune_threshold=False, threshold=0.3,
                  contrast_um=4.0, loss="bce", tta=True, sigma_um=2.5)
    detector = train_point_detector([(image, truth_px(mpp), mpp)], **kwargs)
    assert detector.net.enc0[0].in_channels == 2 and detector.net.levels == 4
    odd = darkness(image)[:250, :246]  # sides not multiples of 8: padded inside
    assert detector.heat_map(odd).shape == odd.shape
    od = darkness(image)[:256, :248]
    heat = detector.heat_map(od)
    assert heat.shape == od.shape and np.all((heat >= 0) & (heat <= 1))
    np.testing.assert_allclose(detector.heat_map(od[:, ::-1].copy())[:, ::-1], heat, atol=1e-5)
    loaded = load(detector.save(tmp_path / "deep.pt"))
    assert loaded.params == detector.params
    np.testing.assert_array_equal(loaded.heat_map(od), heat)
    np.testing.assert_array_equal(loaded(image, mpp).xy, detector(image, mpp).xy)
    assert sum(p.numel() for p in HeatNet((16, 32, 48, 64)).parameters()) < 300_000  # about 1 MB of float32
    with pytest.raises(ValueError):
        train_point_detector([(image, truth_px(mpp), mpp)], **{**kwargs, "loss": "l1"})
    with pytest.raises(ValueError):
        PointSettings(widths=(8,)).validate()


def test_point_detector_ensemble_one_file_averages_members_equal_to_single_trainings(tmp_path: Path) -> None:
    """An ensemble of three: member i is the network a single training with seed + i gives, its map is the mean of
    the members' maps, and one file keeps all members, their seeds and records; `combine` of single trainings
    gives the same detector; mismatched members are refused; files of the first format still load."""
    torch = pytest.importorskip("torch")
    from cytoretrieve.sources.slides.detectors.learned import combine, load, train_point_detector

    torch.set_num_threads(1)
    mpp = 0.5
    image = draw_field(mpp)
    samples = [(image, truth_px(mpp), mpp)]
    kwargs = dict(steps=3, batch=2, patch_px=64, widths=(4, 8, 8), tune_threshold=False, threshold=0.3)
    ensemble = train_point_detector(samples, names=["drawn"], seed=5, ensemble=3, **kwargs)
    singles = [train_point_detector(samples, names=["drawn"], seed=s, **kwargs) for s in (5, 6, 7)]
    assert len(ensemble.nets) == 3 and ensemble.params.seeds == [5, 6, 7]
    assert [m["seed"] for m in ensemble.record["members"]] == [5, 6, 7]
    od = darkness(image)
    maps = [s.heat_map(od) for s in singles]
    assert not np.array_equal(maps[0], maps[1])  # the seeds differ
    np.testing.assert_allclose(ensemble.heat_map(od), np.mean(maps, axis=0), atol=1e-6)

    path = ensemble.save(tmp_path / "ensemble.pt")
    loaded = get_detector(path)
    assert loaded.params == ensemble.params and loaded.settings["ensemble"] == 3
    assert loaded.record["members"] == ensemble.record["members"] and loaded.record["names"] == ["drawn"]
    np.testing.assert_array_equal(loaded.heat_map(od), ensemble.heat_map(od))
    a, b = ensemble(image, mpp), loaded(image, mpp)
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.confidence, b.confidence)
    assert load(path, tta=True).params.tta and len(load(path, tta=True).nets) == 3
    with pytest.raises(ValueError, match="ensemble"):
        load(path, ensemble=2)

    joined = combine(singles[::-1], threshold=0.4)  # any order: sorted by seed
    assert joined.params.ensemble == 3 and joined.params.seed == 5 and joined.params.threshold == 0.4
    assert [m["seed"] for m in joined.record["members"]] == [5, 6, 7]
    np.testing.assert_allclose(joined.heat_map(od), ensemble.heat_map(od), atol=1e-6)
    other = train_point_detector(samples, names=["drawn"], seed=8, **{**kwargs, "widths": (4, 8, 16)})
    for bad in ([singles[0], singles[2]], [*singles, other], [singles[0], singles[0]], []):
        with pytest.raises(ValueError):
            combine(bad)
    with pytest.raises(ValueError):
        combine(singles, steps=9)  # training settings cannot change
    with pytest.raises(ValueError):
        train_point_detector(samples, ensemble=0, **kwargs)

    blob = torch.load(singles[0].save(tmp_path / "single.pt"), weights_only=True)
    blob["format"], blob["state_dict"] = "cytoretrieve-point-detector/1", blob.pop("state_dicts")[0]
    del blob["settings"]["ensemble"]  # the one-network file written before ensembles
    torch.save(blob, tmp_path / "first_format.pt")
    np.testing.assert_array_equal(get_detector(tmp_path / "first_format.pt").heat_map(od), maps[0])


def test_registry_returns_a_registered_toy_detector() -> None:
    class Toy:
        name = "toy"

        def __init__(self, spot: float = 5.0) -> None:
            self.settings = {"spot": spot}

        def __call__(self, image: np.ndarray, mpp: float) -> Nuclei:
            one = np.array([self.settings["spot"]])
            return Nuclei(x=one, y=one, area_um2=one, darkness=one, confidence=[1.0], cell_area_um2=[np.nan],
                          nc_ratio=[np.nan], mpp=mpp)

    register_detector("toy-test", Toy)
    try:
        det = get_detector("toy-test", spot=7.0)
        assert isinstance(det, Toy) and det.settings == {"spot": 7.0}
        assert det(np.zeros((4, 4), np.uint8), 0.5).x.tolist() == [7.0]
        with pytest.raises(ValueError):
            register_detector("toy-test", Toy)
    finally:
        DETECTORS.pop("toy-test", None)
    assert isinstance(get_detector(), ClassicDetector)
    with pytest.raises(ValueError):
        get_detector("no-such-detector")


def _cervix93_points(frame: str) -> np.ndarray:
    with open(CERVIX93 / "points.csv", newline="") as fh:
        return np.array([(float(r["x"]), float(r["y"])) for r in csv.DictReader(fh) if r["frame"] == frame])


def test_classic_on_real_cervix93_training_fields() -> None:
    """A floor on two training fields (set 0), pooled: a pale-nucleus HSIL field (frame001) keeps recall modest."""
    frames = ["frame000", "frame001"]
    if not all((CERVIX93 / "EDF" / f"{f}.png").is_file() for f in frames):
        pytest.skip(f"Cervix93 not found at {CERVIX93}")
    from PIL import Image

    detector = get_detector("classic")
    total = count(np.zeros((0, 2)), np.zeros((0, 2)), 1.0)
    for frame in frames:
        image = np.asarray(Image.open(CERVIX93 / "EDF" / f"{frame}.png"))
        total = total + count(detector(image, 0.25).xy, _cervix93_points(frame), radius_px=13.5)
    assert total.tp + total.fn == 82  # 28 + 54 annotated nuclei
    assert total.recall >= 0.55 and total.precision >= 0.75, total.to_dict()


def _regions_one_by_one(od: np.ndarray, smooth: np.ndarray, seeds: np.ndarray, s, px: float) -> dict:
    """The definition `measure_regions` computes for all regions at once, region by region (as it once did)."""
    from scipy import ndimage as ndi

    markers = np.zeros(od.shape, np.int32)
    markers[seeds[:, 0], seeds[:, 1]] = np.arange(1, len(seeds) + 1)
    top = float(smooth.max())
    basins = ndi.watershed_ift(np.clip((top - smooth) / top * 65000, 0, 65000).astype(np.uint16), markers)
    peaks = smooth[seeds[:, 0], seeds[:, 1]]
    regions = np.where((smooth >= s.region_fraction * peaks[np.maximum(basins, 1) - 1]) & (basins > 0), basins, 0)
    od_smooth = ndi.gaussian_filter(od, s.sigma_um / px)
    ring_px = max(1, int(round(s.ring_um / px)))
    out = {k: np.full(len(seeds), np.nan) for k in ("x", "y", "area_um2", "contrast_od", "darkness_od")}
    for i, (r, c) in enumerate(seeds):
        pieces, _ = ndi.label(regions == i + 1)
        if pieces[r, c] == 0:
            continue
        region = ndi.binary_fill_holes(pieces == pieces[r, c])
        ring = ndi.binary_dilation(region, iterations=ring_px) & ~region
        rows, cols = np.nonzero(region)
        out["x"][i], out["y"][i], out["area_um2"][i] = cols.mean(), rows.mean(), len(rows) * px**2
        out["contrast_od"][i] = od_smooth[region].mean() - od_smooth[ring].mean()
        out["darkness_od"][i] = od[region].mean()
    return out


def test_regions_measured_at_once_equal_region_by_region() -> None:
    """`measure_regions` measures every region in one pass (bincounts, one sparse graph, shared rings); a dark
    ring around a dot (a region enclosing another), touching nuclei and the drawn field give what measuring each
    region alone gives."""
    from scipy import ndimage as ndi

    from cytoretrieve.sources.slides.detectors.classic import ClassicSettings, _tophat, measure_regions

    s, px = ClassicSettings(), 0.5
    image = draw_field(px)
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    dist = np.hypot(xx - 200, yy - 60)
    image[(dist >= 8) & (dist <= 12)] = 90  # a dark ring ...
    image[dist <= 2] = 120  # ... around a paler dot
    image[np.hypot(xx - 40, yy - 200) <= 7] = 95  # two touching nuclei
    image[np.hypot(xx - 52, yy - 200) <= 7] = 80
    od = darkness(image)
    smooth = ndi.gaussian_filter(_tophat(od, s, px), s.sigma_um / px)
    window = int(round(2 * s.min_separation_um / px)) + 1
    peaks = (smooth == ndi.maximum_filter(smooth, size=window, mode="nearest")) & (smooth >= s.seed_min_od)
    seeds = np.argwhere(peaks)
    seeds = seeds[np.hypot(seeds[:, 1] - 200, seeds[:, 0] - 60) > 16]
    seeds = np.vstack([seeds, [[60, 210], [60, 200]]])  # one seed on the ring, one on the dot
    table, labels = measure_regions(od, smooth, seeds, s, px)
    expected = _regions_one_by_one(od, smooth, seeds, s, px)
    for k, v in expected.items():
        np.testing.assert_allclose(table[k], v, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=k)
    ring, dot = len(seeds) - 2, len(seeds) - 1
    assert table["area_um2"][ring] > 0.8 * np.pi * (12 * px) ** 2 > 8 * table["area_um2"][dot] > 0  # filled: holds the dot
    assert labels[60, 200] == min(ring, dot) + 1  # a pixel two filled regions cover keeps the lower label


def test_fast_darkness_seeds_and_holes_equal_their_definitions() -> None:
    """The classic detector's shortcuts give exactly what they replace: `od_map` (a lookup table per channel) the
    numbers of `darkness`, `seed_points` the rounded `center_of_mass` of each peak group, `_holes` the holes
    `binary_fill_holes` fills."""
    from scipy import ndimage as ndi

    from cytoretrieve.sources.slides.detectors.classic import _holes, od_map, seed_points

    rgb = draw_field(0.5, rgb=True)
    for image in (rgb, rgb[..., 0], np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), rgb[::3, ::2]):
        np.testing.assert_array_equal(od_map(image), darkness(image))
    with pytest.raises(ValueError):
        od_map(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        od_map(np.zeros((4, 4, 2), dtype=np.uint8))
    rng = np.random.default_rng(3)
    peaks = rng.random((60, 70)) > 0.93
    peaks[10, 10:13] = peaks[11, 11] = True  # a group of several pixels
    lab, n = ndi.label(peaks)
    expected = np.round(np.asarray(ndi.center_of_mass(peaks, lab, np.arange(1, n + 1)))).astype(int)
    np.testing.assert_array_equal(seed_points(peaks), expected)
    assert seed_points(np.zeros((5, 5), bool)).shape == (0, 2)
    for p in (0.3, 0.5, 0.7):
        fg = ndi.binary_opening(rng.random((80, 90)) < p)
        fg[20:30, 20:30], fg[23:27, 23:27] = True, False  # a hole for sure
        np.testing.assert_array_equal(_holes(fg), ndi.binary_fill_holes(fg) & ~fg)
    assert not _holes(np.ones((4, 4), bool)).any() and not _holes(np.zeros((4, 4), bool)).any()


def test_prefiltered_candidates_select_the_same_nuclei_and_hulls_match_qhull() -> None:
    """`candidates(prefilter=True)` skips the ring and the hull of candidates the cheaper rules reject: `select`
    keeps the same ones, measured the same; `_solidity` (a monotone chain over each row's end corners) is what
    Qhull gives over every pixel corner."""
    from scipy import ndimage as ndi

    from cytoretrieve.sources.slides.detectors.classic import (
        ClassicSettings,
        _solidity,
        _solidity_qhull,
        candidates,
        select,
    )

    s = ClassicSettings()
    for mpp, rgb in ((0.5, True), (0.25, False)):
        image = draw_field(mpp, rgb=rgb)
        full, fast = candidates(image, mpp, s), candidates(image, mpp, s, prefilter=True)
        keep = select(full.table, s)
        assert keep.sum() >= 3
        np.testing.assert_array_equal(select(fast.table, s), keep)
        for k, v in full.table.items():
            np.testing.assert_array_equal(fast.table[k][keep], v[keep], err_msg=k)
        assert np.isnan(fast.table["contrast_od"]).sum() > np.isnan(full.table["contrast_od"]).sum()
    rng = np.random.default_rng(1)
    for _ in range(40):
        blob = ndi.binary_opening(ndi.gaussian_filter(rng.random((18, 18)), 2) > 0.5)
        lab, n = ndi.label(blob)
        if n:
            rows, cols = np.nonzero(lab == 1)
            assert abs(_solidity(rows, cols) - _solidity_qhull(rows, cols)) < 1e-12
            assert abs(_solidity(rows[::-1], cols[::-1]) - _solidity_qhull(rows, cols)) < 1e-12  # any order
    assert _solidity(np.array([0, 0]), np.array([0, 1])) == 1.0
