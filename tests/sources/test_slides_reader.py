"""Reading slides: mpp from metadata or the user, level choice, clear errors, a picklable per-process reader."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import slide_id
from cytoretrieve.sources.slides.reader import Slide, SlideReader, choose_level, diagnose, resolve_mpp
from helpers.paths import WSI
from helpers.synthetic_slides import MPP, STAIN, slide_folder


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    return slide_folder(tmp_path_factory.getbasetemp() / "slides")


def _wsi(name: str) -> Path:
    path = WSI / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_slide_id_strips_slide_suffixes_only() -> None:
    assert slide_id("a/b/CMU-1.svs") == "CMU-1"
    assert slide_id("x.TIFF") == "x"
    assert slide_id("case.07") == "case.07"


def test_mpp_from_resolution_tags(slides) -> None:
    with Slide(slides["standard"]) as s:
        assert s.info.mpp == pytest.approx(MPP)
        assert s.info.mpp_source == "slide"
        assert s.info.level_downsamples == (1.0, 2.0, 4.0, 16.0)
        assert s.info.dimensions == (5120, 3840)


def test_slide_without_mpp_needs_the_user(slides) -> None:
    with pytest.raises(CytoError, match="`mpp`") as e:
        Slide(slides["nompp"])
    assert "\n" not in str(e.value)
    with Slide(slides["nompp"], mpp=0.25) as s:
        assert (s.info.mpp, s.info.mpp_source) == (0.25, "--mpp")
    with Slide(slides["nompp"], objective=40) as s:
        assert (s.info.mpp, s.info.mpp_source) == (0.25, "--objective")


def test_resolve_mpp_order_and_plausibility() -> None:
    assert resolve_mpp({"openslide.mpp-x": "0.499"}, mpp=0.25) == (0.499, "slide")
    assert resolve_mpp({}, objective=20) == (0.5, "--objective")
    with pytest.raises(CytoError, match="objective power 20"):
        resolve_mpp({"openslide.objective-power": "20"})
    with pytest.raises(CytoError, match="implausible"):  # a 72 dpi generic TIFF says nothing about the microscope
        resolve_mpp({"openslide.mpp-x": "352.77"})
    assert resolve_mpp({"openslide.mpp-x": "352.77"}, mpp=0.5) == (0.5, "--mpp")


@pytest.mark.parametrize(
    "downsamples, mpp, target, level, read, extent, tile_mpp",
    [
        ((1, 2, 4, 16), 0.25, 0.5, 1, 320, 640, 0.5),  # a level matches: read as is
        ((1, 2, 4, 16), 0.25, 1.0, 2, 320, 1280, 1.0),
        ((1, 2, 4, 16), 0.25, 0.4, 0, 512, 512, 0.4),  # between levels: the finer one, resized
        ((1, 4, 16), 0.25, 0.5, 0, 640, 640, 0.5),  # no 20x level: 40x read and halved
        ((1,), 0.499, 0.5, 0, 320, 320, 0.499),  # within 2%: read as is
        ((1,), 1.0, 0.5, 0, 160, 160, 0.5),  # 10x slide: upsampled
    ],
)
def test_choose_level(downsamples, mpp, target, level, read, extent, tile_mpp) -> None:
    c = choose_level(downsamples, mpp, target, 320)
    assert (c.level, c.read_size, c.extent) == (level, read, extent)
    assert c.tile_mpp == pytest.approx(tile_mpp)


def test_choose_level_refuses_large_upsampling() -> None:
    with pytest.raises(CytoError, match="enlarge"):
        choose_level((1,), 4.0, 0.5, 320)


def test_truncated_and_non_slides_say_why(slides, tmp_path) -> None:
    with pytest.raises(CytoError, match="truncated"):
        Slide(slides["truncated"])
    with pytest.raises(CytoError, match="PNG"):
        Slide(slides["notslide"])
    (tmp_path / "notes.svs").write_text("hello")
    assert "not a whole-slide image" in diagnose(tmp_path / "notes.svs")
    assert diagnose(tmp_path / "missing.svs") == "no such file"
    assert "folder" in diagnose(tmp_path)


def test_read_tile_rgb_and_resized(slides) -> None:
    with Slide(slides["standard"]) as s:
        tile = s.read_tile(1280, 640, 1, 320, 320)
        assert tile.mode == "RGB" and tile.size == (320, 320)
        assert np.asarray(tile).reshape(-1, 3).min(0).tolist() == list(STAIN)
        small = s.read_tile(1280, 640, 0, 640, 320)  # the same square from level 0, halved
        assert np.abs(np.asarray(small, np.int16) - np.asarray(tile, np.int16)).max() <= 1


def _read_in_child(reader: SlideReader, path: str) -> tuple[int, tuple[int, ...]]:
    image = reader.read_tile(path, 1280, 640, 1, 320, 320)
    return reader.open_count, tuple(np.asarray(image)[0, 0])


def test_reader_is_picklable_and_opens_per_process(slides, monkeypatch) -> None:
    reader = SlideReader(cache_bytes=8 << 20, max_open=2)
    reader.read_tile(slides["standard"], 0, 0, 1, 320, 320)
    assert reader.open_count == 1
    clone = pickle.loads(pickle.dumps(reader))  # only the settings travel
    assert clone.open_count == 0 and clone.max_open == 2
    ctx = multiprocessing.get_context("forkserver")  # as the embed job's DataLoader workers
    with ctx.Pool(2) as pool:
        out = pool.starmap(_read_in_child, [(reader, str(slides["standard"]))] * 4)
    assert all(count == 1 and rgb == STAIN for count, rgb in out)
    parent = reader.handle(slides["standard"])
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as seen from a forked child
    assert reader.handle(slides["standard"]) is not parent
    monkeypatch.undo()
    for name in ("standard", "empty", "nompp"):  # the least recently used handle is closed
        reader.read_tile(slides["standard" if name == "nompp" else name], 0, 0, 0, 16, 16)
    assert reader.open_count == 2
    reader.close()
    assert reader.open_count == 0


def test_real_svs(slides) -> None:
    with Slide(_wsi("CMU-1-Small-Region.svs")) as s:
        assert s.info.vendor == "aperio" and s.info.dimensions == (2220, 2967)
        assert s.info.mpp == pytest.approx(0.499) and s.info.objective == 20
        c = s.choose_level(0.5, 320)
        assert (c.level, c.read_size, c.extent) == (0, 320, 320)
        mean = np.asarray(s.read_rgb(1000, 1000, 0, (256, 256))).reshape(-1, 3).mean(0)
        assert np.allclose(mean, (151, 104, 144), atol=3)


def test_boxes_pyramid_levels() -> None:
    with Slide(_wsi("boxes.tiff"), mpp=0.25) as s:  # its 72 dpi "mpp" is ignored
        assert s.info.mpp_source == "--mpp"
        assert s.info.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        assert s.choose_level(1.0, 32).level == 2  # downsample 4.016: within 2% of 1.0 um/px
