"""The focus score (`sources/slides/focus.py`) and focal-plane reduction (`sources/slides/planes.py`), on
synthetic fields and on the real 20-plane ISBI 2015 stack."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.focus import BLURRED, focus_score, sharpness
from cytoretrieve.sources.slides.planes import EDF, best_plane, edf, parse_plane, read_region
from cytoretrieve.sources.slides.reader import Slide
from helpers.planes import ISBI, sharp_field, u8, write_planes


def test_focus_falls_with_blur_and_ignores_glass_and_contrast() -> None:
    sharp = sharp_field()
    scores = [focus_score(u8(ndimage.gaussian_filter(sharp, s))) for s in (0.01, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores  # strictly falls with defocus
    assert scores[0] > BLURRED and scores[0] > 10 * scores[-1]
    # glass with camera noise: nothing to judge (None), never "blurred"
    glass = np.random.default_rng(1).normal(228, 2, (256, 256, 3))
    assert focus_score(u8(glass)) is None
    # contrast-normalised: a paler copy of the same sharp field scores about the same
    pale = 225 - (225 - sharp) * 0.4
    assert focus_score(u8(pale)) == pytest.approx(scores[0], rel=0.3)
    # grey input and its RGB repetition score the same
    grey = u8(sharp)
    assert focus_score(grey) == pytest.approx(focus_score(np.repeat(grey[..., None], 3, 2)), rel=1e-6)
    # mostly glass around one sharp cell: still sharp (glass is not counted)
    one = np.full((256, 256), 225.0)
    one[100:140, 100:140] = sharp_field(40, seed=3, cells=1)
    assert focus_score(u8(one)) is None or focus_score(u8(one)) > BLURRED


def test_parse_plane() -> None:
    assert [parse_plane(v) for v in (None, "", "best", "EDF", "3", 2)] == [None, None, "best", "edf", 3, 2]
    for bad in ("sharpest", "-1", -2, 1.5):
        with pytest.raises(CytoError, match="`plane`"):
            parse_plane(bad)


def test_best_and_edf_on_a_two_depth_field(tmp_path) -> None:
    folder = write_planes(tmp_path / "stack")
    with Slide(folder, mpp=0.5) as slide:
        assert (slide.info.planes, slide.info.grey, slide.info.backend) == (5, True, "image")
        b = slide.backend
        left, used = read_region(b, 0, 0, 0, (128, 256), "best")
        assert used == 1  # the left half is sharp at plane 1
        right, used = read_region(b, 128, 0, 0, (128, 256), "best")
        assert used == 3
        whole, used = read_region(b, 0, 0, 0, (256, 256), "edf")
        assert used == EDF
        planes = [np.asarray(read_region(b, 0, 0, 0, (256, 256), k)[0]) for k in range(5)]
        # the composite is sharper than every single plane: each half comes from its own sharp plane
        assert sharpness(np.asarray(whole)) > max(sharpness(p) for p in planes)
        assert focus_score(np.asarray(whole)) > max(focus_score(p) for p in planes)
        assert read_region(b, 0, 0, 0, (64, 64), None)[1] == 0
        with pytest.raises(CytoError, match="plane 7"):
            read_region(b, 0, 0, 0, (64, 64), 7)
    single = tmp_path / "one.png"
    Image.fromarray(u8(sharp_field(64))).save(single)
    with Slide(single, mpp=0.5) as slide:  # a single-plane image reads the same under best and edf
        assert read_region(slide.backend, 0, 0, 0, (64, 64), "edf")[1] == 0


@pytest.mark.skipif(not (ISBI / "stack").is_dir(), reason="ISBI 2015 stack not in ../shared/data")
def test_isbi_edf_beats_the_median_plane() -> None:
    """The real 20-plane field: our EDF is at least as sharp as the median plane and the classic detector finds at
    least as many of the 49 marked nuclei on it (the figures: experiments/isbi_planes.py)."""
    from cytoretrieve.sources.slides.detectors import get_detector
    from cytoretrieve.sources.slides.detectors.evaluate import count
    from experiments.isbi_planes import MPP, load_planes, truth_points

    planes = load_planes(ISBI / "stack")
    assert len(planes) == 20 and planes[0].shape == (1024, 1024, 3)
    sharp = [sharpness(p) for p in planes]
    median_plane = int(np.argsort(sharp)[len(sharp) // 2])
    ours = edf(planes)
    assert sharpness(ours) >= statistics.median(sharp)
    best = best_plane(planes)
    assert sharpness(planes[best]) == max(sharp)  # the focus score picks the sharpest plane of the field
    truth = truth_points(ISBI / "frame011_NUGT.png")
    assert len(truth) == 49
    detect = get_detector("classic")
    found = {name: count(detect(im, MPP).xy, truth, 6.0 / MPP) for name, im in
             (("edf", ours), ("median", planes[median_plane]), ("plane0", planes[0]))}
    assert found["edf"].tp >= found["median"].tp and found["edf"].tp >= 40
    assert found["edf"].f1 >= found["median"].f1 - 0.02
    assert found["plane0"].tp < 20  # the most defocused plane really is defocused
