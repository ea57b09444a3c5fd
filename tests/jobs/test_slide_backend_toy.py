"""A new slide format is one registration: a toy backend, registered only here, is tiled by the real `tile` job and
embedded by the real `embed` job; and a camera field (PNG) with `mpp` is tiled like a one-level slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cytoretrieve.jobs.embed import embed
from cytoretrieve.jobs.tile import tile_slides
from cytoretrieve.models.backbones import load_backbone
from cytoretrieve.sources.slides import backends
from cytoretrieve.sources.slides.backends import SlideBackend, register_backend
from cytoretrieve.sources.slides.grid import GridSpec
from cytoretrieve.store.tables import Store
from cytoretrieve.store.tiles import open_tile_table

GLASS, STAIN = (236, 236, 232), (150, 80, 160)


class ToySlide(SlideBackend):
    """A `.toy` file: JSON with a size, an mpp, a stain colour and a stained block, drawn on demand at two levels."""

    name = "toy"

    def __init__(self, path: Path) -> None:
        spec = json.loads(path.read_text())
        w, h = spec["size"]
        self.dimensions = (w, h)
        self.level_dimensions = ((w, h), (w // 4, h // 4))
        self.level_downsamples = (1.0, 4.0)
        self.mpp, self.vendor = spec["mpp"], "toy"
        self.colour, self.block = tuple(spec["colour"]), spec["block"]

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int], *, plane: int = 0) -> Image.Image:
        ds = self.level_downsamples[level]
        xs = x + np.arange(size[0]) * ds  # level-0 position of each pixel
        ys = y + np.arange(size[1]) * ds
        x0, y0, x1, y1 = self.block
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        out = np.where(inside[:, :, None], np.array(self.colour, np.uint8), np.array(GLASS, np.uint8))
        return Image.fromarray(out.astype(np.uint8), "RGB")

    def close(self) -> None:
        pass


def test_a_toy_backend_is_tiled_and_embedded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS.copy())  # the registration ends with the test
    register_backend("toy", lambda path, **options: ToySlide(path), extensions=(".toy",),
                     probe=lambda path: path.read_text().lstrip().startswith("{"))
    slide = tmp_path / "field.toy"
    slide.write_text(json.dumps({"size": [2560, 1920], "mpp": 0.25, "colour": STAIN, "block": [640, 640, 1920, 1280]}))
    store = Store(tmp_path / "store")

    report = tile_slides([slide], store, table="toy", spec=GridSpec(rule="coverage"))
    assert [r.status for r in report.results] == ["tiled"], report.results[0].reason
    rows = open_tile_table(store, "toy").rows()
    assert {(r["x"], r["y"]) for r in rows} == {(640, 640), (1280, 640)}  # the block's two 640 px tiles
    assert all((r["level"], r["read_size"], r["extent"]) == (0, 640, 640) and r["mpp"] == 0.5 for r in rows)

    done = embed("toy", load_backbone("resnet18", "random", image_size=32), store, workers=0)
    assert done.added == 2 and not done.failed
    stored = store.open(done.table).read(["id", "slide"]).to_pylist()
    assert {r["id"] for r in stored} == {r["id"] for r in rows} and {r["slide"] for r in stored} == {"field.toy"}


def test_a_camera_field_with_mpp_is_tiled_like_a_slide(tmp_path) -> None:
    pixels = np.empty((960, 1280, 3), np.uint8)
    pixels[:] = GLASS
    pixels[320:640, 320:960] = STAIN
    fields = tmp_path / "fields"
    fields.mkdir()
    Image.fromarray(pixels).save(fields / "fov1.png")
    store = Store(tmp_path / "store")
    skipped = tile_slides([fields], store, table="fields", spec=GridSpec(rule="coverage"))
    assert skipped.results[0].status == "skipped" and "`mpp`" in skipped.results[0].reason
    report = tile_slides([fields], store, table="fields", spec=GridSpec(rule="coverage"), mpp=0.5)
    assert [(r.slide, r.status, r.mpp_source) for r in report.results] == [("fov1", "tiled", "--mpp")]
    rows = open_tile_table(store, "fields").rows()
    assert {(r["x"], r["y"]) for r in rows} == {(320, 320), (640, 320)}
