"""Slide backends: the registry picks OpenSlide, tifffile or the image backend by extension and content; each reads
its files exactly (levels, focal planes, grey fields, mpp) and says in one line why it cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.backends import BACKENDS, choose_backend, open_slide_file
from cytoretrieve.sources.slides.reader import Slide, SlideReader
from helpers.paths import SHARED_DATA, SVS
from helpers.synthetic_slides import slide_folder

STACK = SHARED_DATA / "isbi2015_zstack" / "stack"


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    return slide_folder(tmp_path_factory.getbasetemp() / "slides")


def _planes(n: int = 3, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (n, *shape, 3), dtype=np.uint8)


def test_builtins_in_order_openslide_first() -> None:
    assert list(BACKENDS)[:3] == ["openslide", "tifffile", "image"]


def test_registry_chooses_openslide_for_svs_and_image_for_png(tmp_path) -> None:
    if not SVS.is_file():
        pytest.skip(f"{SVS} not found")
    assert choose_backend(SVS).name == "openslide"
    with open_slide_file(SVS) as b:
        assert b.name == "openslide" and b.vendor == "aperio" and b.mpp == pytest.approx(0.499)
        assert b.objective == 20 and b.planes == 1 and "thumbnail" in b.associated_images
    field = tmp_path / "field.png"
    Image.new("RGB", (64, 48), (200, 120, 180)).save(field)
    assert choose_backend(field).name == "image"


def test_openslide_and_tifffile_read_the_same_pyramid(slides) -> None:
    with Slide(slides["standard"]) as a, Slide(slides["standard"], backend="tifffile") as b:
        assert (a.info.backend, b.info.backend) == ("openslide", "tifffile")
        assert a.info.level_dimensions == b.info.level_dimensions and a.info.mpp == b.info.mpp == 0.25
        for x, y, level, size in [(1000, 700, 1, (500, 400)), (5000, 3800, 0, (300, 300)), (0, 0, 3, (320, 240))]:
            assert np.array_equal(np.asarray(a.read_rgb(x, y, level, size)), np.asarray(b.read_rgb(x, y, level, size)))


def test_tifffile_reads_an_untiled_tiff(tmp_path) -> None:
    pixels = _planes(1)[0]
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    assert choose_backend(path).name == "tifffile"  # OpenSlide refuses untiled TIFFs
    with Slide(path) as s:
        assert (s.info.backend, s.info.mpp, s.info.mpp_source, s.info.planes) == ("tifffile", 0.5, "slide", 1)
        assert np.array_equal(np.asarray(s.read_rgb(0, 0, 0, (128, 96))), pixels)
        corner = np.asarray(s.read_rgb(100, 80, 0, (40, 30)))  # beyond the image: background
        assert np.array_equal(corner[:16, :28], pixels[80:, 100:]) and (corner[16:] == 255).all()


def test_tifffile_reads_every_plane_of_an_ome_z_stack(tmp_path) -> None:
    stack = _planes(3)
    path = tmp_path / "field.ome.tif"
    tifffile.imwrite(path, stack, photometric="rgb", tile=(64, 64), compression="zlib",
                     metadata={"axes": "ZYXS", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm"})
    assert choose_backend(path).name == "tifffile"  # tiled, so OpenSlide would open it: the OME-XML says planes
    with Slide(path) as s:
        assert (s.info.planes, s.info.mpp, s.info.vendor, s.info.dimensions) == (3, 0.25, "ome-tiff", (128, 96))
        read = [np.asarray(s.read_rgb(0, 0, 0, (128, 96), plane=p)) for p in range(3)]
        assert all(np.array_equal(r, stack[p]) for p, r in enumerate(read))
        assert not np.array_equal(read[0], read[1])
        with pytest.raises(CytoError, match="plane 3"):
            s.read_rgb(0, 0, 0, (8, 8), plane=3)


def test_grey_png_is_rgb_and_needs_mpp(tmp_path) -> None:
    grey = np.arange(64 * 80, dtype=np.uint32).reshape(64, 80).astype(np.uint8)
    path = tmp_path / "field.png"
    Image.fromarray(grey, "L").save(path)
    with pytest.raises(CytoError, match="`mpp`") as e:
        Slide(path)
    assert "\n" not in str(e.value) and "camera image" in str(e.value)
    with Slide(path, mpp=0.3) as s:
        assert (s.info.backend, s.info.grey, s.info.mpp_source, s.info.level_downsamples) == ("image", True, "--mpp", (1.0,))
        region = s.read_rgb(0, 0, 0, (80, 64))
        assert region.mode == "RGB" and np.array_equal(np.asarray(region), np.repeat(grey[:, :, None], 3, 2))


def test_reader_reads_plain_images_by_row(tmp_path) -> None:
    path = tmp_path / "field.jpg"
    Image.new("RGB", (300, 200), (30, 60, 90)).save(path, quality=100)
    tile = SlideReader().read_tile(path, 100, 50, 0, 64, 32)
    assert tile.size == (32, 32) and np.abs(np.asarray(tile, np.int16) - (30, 60, 90)).max() <= 3


def test_folder_of_planes_is_one_field() -> None:
    if not STACK.is_dir():
        pytest.skip(f"{STACK} not found")
    with Slide(STACK, mpp=0.2) as s:
        assert (s.info.backend, s.info.planes, s.info.grey, s.info.dimensions) == ("image", 20, True, (1024, 1024))
        first = np.asarray(s.read_rgb(0, 0, 0, (1024, 1024), plane=0))
        last = np.asarray(s.read_rgb(0, 0, 0, (1024, 1024), plane=19))
        expected = np.asarray(Image.open(STACK / "fov019.png").convert("RGB"))
        assert np.array_equal(last, expected) and not np.array_equal(first, last)


def test_unknown_or_mislabelled_files_say_why_in_one_line(slides, tmp_path) -> None:
    notes = tmp_path / "notes.xyz"
    notes.write_text("hello")
    for path, why in [(notes, "not a whole-slide image"), (slides["notslide"], "PNG"), (tmp_path / "no.svs", "no such file"),
                      (slides["truncated"], "truncated")]:
        with pytest.raises(CytoError, match=why) as e:
            open_slide_file(path)
        assert "\n" not in str(e.value)
    with pytest.raises(CytoError, match="unknown slide backend 'nope'"):
        open_slide_file(notes, backend="nope")
