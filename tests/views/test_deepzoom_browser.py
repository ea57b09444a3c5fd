"""The slide viewer end to end in headless Chromium (Debian's package, driven by Playwright, as test_browser.py):
search the CMU-1-Small-Region tile table by a stored tile, click a hit, and check that OpenSeadragon opened its
slide centred on it (the viewport's centre, read from the page, lies inside the hit's square), the query's slide
beside it centred on the query, the overlay canvas drawn (and dimmed by the opacity slider), the scale bar true
to the slide's mpp, keyboard zoom and synced panning working, every tile answered 200 and decoding as a JPEG, no
request leaving 127.0.0.1, a slide whose file moved named in one line, and traversal attempts on the tile route
answered 4xx.

The slide view is screenshotted into the test's temporary folder (`viewer_slide.png`); set
`CYTORETRIEVE_SLIDE_SCREENSHOT=PATH` to also write it there (docs/viewer_slide.png is made so).
"""

from __future__ import annotations

import http.client
import io
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from cytoretrieve.cli import run
from helpers.browser import SLIDE, loopback_page, needs_chromium, serving_slides, slide_store
from helpers.herlev_subset import TILE_TABLE, add_tiles
from helpers.paths import SVS

K = 8

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("deepzoom_browser")
    store = slide_store(tmp)
    add_tiles(store)
    moved = tmp / "moved.svs"  # tiled, then its file moved away
    moved.symlink_to(SVS)
    assert run(["tile", str(moved), "--store", store.uri, "--table", "moved"]) == 0
    moved.unlink()
    with serving_slides(store, reader=True) as url:
        yield url


def _viewport(page, pane: str) -> dict:  # noqa: ANN001
    """The pane's viewport as the page sees it: centre in slide px, image zoom (screen px per slide px)."""
    return page.evaluate("""(name) => {
      const p = window.cytoSlides.panes[name], v = p.viewer.viewport;
      const c = v.viewportToImageCoordinates(v.getCenter(true));
      return {x: c.x, y: c.y, zoom: v.viewportToImageZoom(v.getZoom(true)), mpp: p.info.mpp,
              drawn: JSON.parse(p.canvas.dataset.drawn || '{}'), loaded: p.tilesLoaded, failed: p.tilesFailed,
              full: p.fullAt === null ? null : p.fullAt - p.clickedAt, anchor: p.anchor};
    }""", pane)


def _painted(page) -> int:  # noqa: ANN001
    """Pixels of the hit pane's overlay canvas that are not transparent."""
    return page.evaluate("""() => {
      const c = window.cytoSlides.panes.hit.canvas, d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;
    }""")


def _inside(v: dict, place: dict) -> bool:
    return place["x"] <= v["x"] <= place["x"] + place["side"] and place["y"] <= v["y"] <= place["y"] + place["side"]


def test_hit_opens_its_slide_centred(base_url: str, tmp_path: Path) -> None:
    tiles: list = []
    with loopback_page(base_url) as page:
        page.on("response", lambda r: tiles.append(r) if "/tiles/" in r.url else None)
        page.goto(base_url)
        page.wait_for_selector(f"#table option[value='{TILE_TABLE}']", state="attached")
        page.select_option("#table", TILE_TABLE)
        page.wait_for_selector("#browse img.cell[data-id*='@']")
        page.fill("#k", str(K))
        page.locator("#browse img.cell").nth(5).click()  # a stored tile as the query
        page.wait_for_function(f"document.querySelectorAll('#results .hit').length === {K}")
        hit_el = page.locator("#results .hit").nth(1)
        hit_id = hit_el.get_attribute("data-id")
        x, y, side = (int(v) for v in hit_id.split("@")[1].split(","))
        hit = {"x": x, "y": y, "side": side}
        hit_el.click()
        page.wait_for_selector("#slide-view:not([hidden])")
        page.wait_for_function("window.cytoSlides.panes.hit && window.cytoSlides.panes.hit.fullAt !== null && "
                               "window.cytoSlides.panes.query && window.cytoSlides.panes.query.fullAt !== null")
        page.wait_for_timeout(300)  # the last animation frame drawn

        v = _viewport(page, "hit")
        assert _inside(v, hit), (v, hit)  # centred on the hit
        assert v["anchor"]["x"] == x and v["anchor"]["y"] == y
        assert v["loaded"] > 0 and v["failed"] == 0
        print(f"click to the hit's slide fully drawn: {v['full']:.0f} ms")
        assert v["full"] < 5_000
        assert v["drawn"]["hits"] >= 1 and v["drawn"]["tiles"] > 0  # the overlay layer: tiles kept and hits
        assert page.is_visible("#pane-query")  # the stored query's slide beside it, centred on the query
        q = _viewport(page, "query")
        assert _inside(q, q["anchor"]) and q["anchor"]["side"] > 0
        assert SLIDE in page.inner_text("#slide-caption") and page.is_hidden("#slide-error")

        painted = _painted(page)  # the opacity slider dims the tiles layer
        assert painted > 500
        page.fill("#overlay-opacity", "0")
        page.dispatch_event("#overlay-opacity", "input")
        assert 0 < _painted(page) < painted  # the hits stay outlined

        bar = page.evaluate("""() => { const b = window.cytoSlides.panes.hit.bar;
          return {um: Number(b.dataset.um), px: b.firstChild.getBoundingClientRect().width, text: b.innerText}; }""")
        v = _viewport(page, "hit")
        assert bar["px"] * v["mpp"] / v["zoom"] == pytest.approx(bar["um"], rel=0.02) and "m" in bar["text"]

        zoomed = ("(before) => { const v = window.cytoSlides.panes.hit.viewer.viewport; "
                  "return v.viewportToImageZoom(v.getZoom(true)) > before * 1.05; }")
        page.focus("#osd-hit .openseadragon-canvas")  # keyboard zoom: OpenSeadragon's keys on the slide
        page.keyboard.press("Equal")
        page.wait_for_function(zoomed, arg=v["zoom"])
        page.wait_for_timeout(600)
        before = _viewport(page, "hit")["zoom"]
        page.focus("#slide-view")  # and the page's own + anywhere in the slide view
        page.keyboard.press("+")
        page.wait_for_function(zoomed, arg=before)

        page.check("#sync")  # synced: the query pane follows at the same physical scale
        page.click("#slide-zoom-in")
        page.wait_for_timeout(800)
        v, q = _viewport(page, "hit"), _viewport(page, "query")
        assert v["zoom"] / v["mpp"] == pytest.approx(q["zoom"] / q["mpp"], rel=0.05)

        shot = tmp_path / "viewer_slide.png"
        page.fill("#overlay-opacity", "70")
        page.dispatch_event("#overlay-opacity", "input")
        page.click("#slide-centre")
        page.wait_for_timeout(800)
        page.locator("#slide-view").screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("CYTORETRIEVE_SLIDE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["CYTORETRIEVE_SLIDE_SCREENSHOT"])

        assert tiles and all(r.status == 200 for r in tiles), [(r.url, r.status) for r in tiles if r.status != 200]
        for r in tiles[:20]:  # each decodes as a JPEG of at most 254 + 2 px a side
            im = Image.open(io.BytesIO(r.body()))
            assert im.format == "JPEG" and 1 <= max(im.size) <= 256
            im.load()

        page.evaluate("window.slideView.open({slide: 'moved', x: 0, y: 0, side: 100, rank: 1, label: null}, null)")
        page.wait_for_selector("#slide-error:not([hidden])")
        message = page.inner_text("#slide-error")
        assert "410" in message and "no longer where it was tiled" in message and "\n" not in message


@pytest.mark.parametrize("path", [
    "/api/slides/../../../../etc/passwd/tiles/0/0_0.jpeg",
    "/api/slides/..%2F..%2F..%2Fetc%2Fpasswd/tiles/0/0_0.jpeg",
    "/api/slides/%2e%2e/tiles/0/0_0.jpeg",
    "/api/slides/..%5C..%5Cetc/tiles/0/0_0.jpeg",
    f"/api/slides/{SLIDE}/tiles/../../../etc/passwd",
    f"/api/slides/{SLIDE}/tiles/0/..%2F..%2F0_0.jpeg",
    f"/api/slides/{SLIDE}/tiles/%2e%2e/0_0.jpeg",
    "/api/slides/%252e%252e%252f/tiles/0/0_0.jpeg",
    "/api/slides/%00/tiles/0/0_0.jpeg",
])
def test_traversal_on_the_tile_route_is_4xx(base_url: str, path: str) -> None:
    """Sent as is over a raw connection (no client normalising the path)."""
    u = urlparse(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    conn.close()
    assert 400 <= response.status < 500 and "root:" not in body and "Traceback" not in body, (response.status, body)
