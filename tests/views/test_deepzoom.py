"""The viewer's Deep Zoom routes with the framework's test client, on the real CMU-1-Small-Region slide tiled into a
store: the geometry is OpenSlide's `DeepZoomGenerator`'s (levels, sizes, tile counts, a tile's pixels), tiles are
JPEG with caching headers, every bad request is a one-line 4xx (unknown slide, tile outside the slide, bad level,
traversal), a slide whose file moved is a 410 saying so, the open-handle cache stays bounded, overlays list the
tiles kept and the cells found, and /docs needs no CDN."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cytoretrieve.cli import run  # noqa: E402
from cytoretrieve.sources.slides.backends import open_slide_file  # noqa: E402
from cytoretrieve.store.tables import Store  # noqa: E402
from cytoretrieve.views.web.app import create_app  # noqa: E402
from cytoretrieve.views.web.deepzoom import DeepZoom  # noqa: E402
from cytoretrieve.views.web.slides import SlideTiles  # noqa: E402
from helpers.paths import SVS  # noqa: E402
from helpers.synthetic_slides import write_standard_slide  # noqa: E402

SLIDE = "CMU-1-Small-Region"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:  # noqa: ANN001
    if not SVS.exists():
        pytest.skip(f"{SVS} not found")
    tmp = tmp_path_factory.mktemp("deepzoom")
    s = Store(tmp / "store")
    assert run(["tile", str(SVS), "--store", s.uri, "--table", "cmu"]) == 0
    moved = tmp / "moved.svs"  # tiled, then its file moved away
    moved.symlink_to(SVS)
    assert run(["tile", str(moved), "--store", s.uri, "--table", "cmu"]) == 0
    moved.unlink()
    pyramid = write_standard_slide(tmp / "pyramid.tiff")
    assert run(["tile", str(pyramid), "--store", s.uri, "--table", "pyr"]) == 0
    return s


@pytest.fixture(scope="module")
def client(store: Store) -> TestClient:
    return TestClient(create_app(store.uri, slide_opener=open_slide_file, tile_quality=90))


def _one_line(response, status: int) -> str:  # noqa: ANN001
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    return detail


@pytest.mark.parametrize("path", [SVS, None])
def test_geometry_is_openslides(path: Path | None, tmp_path: Path) -> None:
    """Levels, their sizes and tile counts, and every tile's region as DeepZoomGenerator computes them, on the real
    SVS (one level) and on a 4-level pyramid (levels read at downsamples 1, 2, 4, 16)."""
    openslide = pytest.importorskip("openslide")
    from openslide.deepzoom import DeepZoomGenerator

    path = path or write_standard_slide(tmp_path / "pyramid.tiff")
    with openslide.OpenSlide(str(path)) as osr:
        theirs = DeepZoomGenerator(osr, tile_size=254, overlap=1)
        ours = DeepZoom(osr.level_dimensions, osr.level_downsamples)
        assert ours.level_count == theirs.level_count
        assert ours.level_dimensions == theirs.level_dimensions and ours.level_dimensions[0] == (1, 1)
        assert ours.level_tiles == theirs.level_tiles and ours.tile_count == theirs.tile_count
        for level in range(ours.level_count):
            cols, rows = ours.level_tiles[level]
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2), (0, rows - 1)}:
                (l0, slide_level, size), out = theirs._get_tile_info(level, (col, row))  # noqa: SLF001
                r = ours.region(level, col, row)
                assert ((r.x, r.y), r.level, r.size, r.out) == (tuple(l0), slide_level, tuple(size), tuple(out))


def test_dzi_and_tiles_match_openslide(client: TestClient) -> None:
    openslide = pytest.importorskip("openslide")
    from openslide.deepzoom import DeepZoomGenerator

    info = client.get(f"/api/slides/{SLIDE}").json()
    with openslide.OpenSlide(str(SVS)) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1)
        assert (info["width"], info["height"]) == osr.dimensions and info["levels"] == dz.level_count
        assert info["mpp"] == pytest.approx(float(osr.properties["openslide.mpp-x"]), rel=1e-3)
        dzi = client.get(f"/api/slides/{SLIDE}/dzi")
        assert dzi.status_code == 200 and dzi.headers["content-type"].startswith("application/xml")
        w, h = osr.dimensions
        assert 'TileSize="254"' in dzi.text and 'Overlap="1"' in dzi.text and f'Width="{w}" Height="{h}"' in dzi.text
        top = dz.level_count - 1
        # levels read tile by tile match the generator's pixels; low levels, cut from one picture of a whole level
        # (see slides.BASE_SIDE), are close to them
        for level, address, exact in [(top, (3, 5), True), (top - 1, (1, 1), True), (top - 3, (0, 1), False),
                                      (0, (0, 0), False)]:
            r = client.get(f"/api/slides/{SLIDE}/tiles/{level}/{address[0]}_{address[1]}.jpeg")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert "max-age" in r.headers["cache-control"] and r.headers["etag"]
            ours = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.float32)
            theirs_im = dz.get_tile(level, address)
            assert ours.shape[:2] == (theirs_im.height, theirs_im.width)
            theirs = np.asarray(theirs_im.convert("RGB"), np.float32)
            assert np.abs(ours - theirs).mean() < 8.0, level  # JPEG (quality 90, 4:2:0) vs the raw tile
            if not exact:
                continue
            buf = io.BytesIO()
            theirs_im.convert("RGB").save(buf, format="JPEG", quality=90)  # the same pixels give the same JPEG
            encoded = np.asarray(Image.open(buf).convert("RGB"), np.float32)
            assert np.abs(ours - encoded).mean() < 0.5, level
    again = client.get(f"/api/slides/{SLIDE}/tiles/{top}/3_5.jpeg", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code in (200, 304)
    cached = client.get(f"/api/slides/{SLIDE}/tiles/{top}/3_5.jpeg")
    assert client.get(f"/api/slides/{SLIDE}/tiles/{top}/3_5.jpeg", headers={"If-None-Match": cached.headers["etag"]}).status_code == 304


def test_pyramid_levels_read_from_coarser_slide_levels(client: TestClient) -> None:
    info = client.get("/api/slides/pyramid").json()
    assert (info["width"], info["height"]) == (5120, 3840) and info["mpp"] == pytest.approx(0.25)
    low = client.get(f"/api/slides/pyramid/tiles/{info['levels'] - 5}/0_0.jpeg")  # downsample 16: slide level 3
    assert low.status_code == 200 and Image.open(io.BytesIO(low.content)).size == (255, 240)  # 254 + 1 overlap; 3840 / 16


def test_bad_requests_are_one_line_4xx(client: TestClient) -> None:
    top = client.get(f"/api/slides/{SLIDE}").json()["levels"] - 1
    assert "no slide" in _one_line(client.get("/api/slides/nope/dzi"), 404)
    assert "no slide" in _one_line(client.get("/api/slides/nope/tiles/0/0_0.jpeg"), 404)
    _one_line(client.get(f"/api/slides/{SLIDE}/tiles/{top}/99_0.jpeg"), 404)  # outside the slide
    _one_line(client.get(f"/api/slides/{SLIDE}/tiles/{top + 1}/0_0.jpeg"), 404)  # no such level
    _one_line(client.get(f"/api/slides/{SLIDE}/tiles/x/0_0.jpeg"), 404)
    _one_line(client.get(f"/api/slides/{SLIDE}/tiles/99999999999/0_0.jpeg"), 404)
    _one_line(client.get(f"/api/slides/{SLIDE}/tiles/{top}/0_0.jpeg?plane=3"), 404)  # one focal plane
    for traversal in ["/api/slides/..%2F..%2Fetc%2Fpasswd/dzi", "/api/slides/%2e%2e/dzi", "/api/slides/..%5Cx/dzi",
                      f"/api/slides/%2e%2e%2f{SLIDE}/tiles/0/0_0.jpeg", "/api/slides/..%252Fetc/tiles/0/0_0.jpeg",
                      f"/api/slides/{SLIDE}/tiles/0/..%2F..%2F0_0.jpeg", "/api/slides/%00/dzi"]:
        r = client.get(traversal)
        assert 400 <= r.status_code < 500 and "Traceback" not in r.text, traversal
    assert client.get("/api/slides/..%2F..%2Fetc%2Fpasswd/tiles/0/0_0.jpeg").status_code in (400, 404)


def test_moved_file_is_one_clear_line(client: TestClient) -> None:
    detail = _one_line(client.get("/api/slides/moved"), 410)
    assert "no longer where it was tiled" in detail and "moved.svs" in detail
    _one_line(client.get("/api/slides/moved/tiles/0/0_0.jpeg"), 410)


def test_handle_cache_is_bounded(store: Store) -> None:
    opened: list[str] = []

    def opener(path: str):  # noqa: ANN202
        opened.append(path)
        return open_slide_file(path)

    tiles = SlideTiles(store, opener, max_open=1)
    try:
        for slide in [SLIDE, "pyramid", SLIDE, SLIDE]:
            tiles.tile(slide, 0, 0, 0)
            assert tiles.open_count == 1
        assert len(opened) == 3  # CMU, pyramid, CMU again (evicted), then reused
    finally:
        tiles.close()


def test_overlays_list_tiles_and_cells(store: Store, client: TestClient) -> None:
    overlays = client.get(f"/api/slides/{SLIDE}/overlays").json()
    (layer,) = overlays["tiles"]
    assert layer["table"] == "cmu" and layer["rows"] == len(layer["tiles"]) > 10 and overlays["cells"] == []
    assert all(len(t) == 3 and t[2] > 0 for t in layer["tiles"])
    assert run(["cells", "find", str(SVS), "--store", store.uri, "--table", "cmu_cells"]) == 0
    overlays = client.get(f"/api/slides/{SLIDE}/overlays").json()
    (cells,) = overlays["cells"]
    assert cells["table"] == "cmu_cells" and cells["rows"] > 100
    nx, ny, x, y, extent = cells["cells"][0]
    assert x <= nx <= x + extent and y <= ny <= y + extent
    _one_line(client.get("/api/slides/nope/overlays"), 404)


def test_docs_page_is_offline(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "/static/vendor/swagger-ui/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    for asset in ["swagger-ui/swagger-ui-bundle.js", "swagger-ui/swagger-ui.css", "openseadragon/openseadragon.min.js",
                  "openseadragon/LICENSE.txt", "swagger-ui/LICENSE"]:
        assert client.get(f"/static/vendor/{asset}").status_code == 200, asset
    assert {"/api/slides/{slide}/dzi", "/api/slides/{slide}/tiles/{level}/{col}_{row}.jpeg"} <= set(
        client.get("/openapi.json").json()["paths"])
