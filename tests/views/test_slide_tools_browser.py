"""The slide viewer's tools in headless Chromium (as test_deepzoom_browser.py): the measuring tool (a line dragged
between two known viewport points shows its length in um from the slide's mpp, in px on a slide without one;
Escape clears it), a saved score run (`store.scores`, what `score --save-scores` writes) drawn over its slide as a
heat map with a legend and the opacity slider, and "similar slides" (the nearest slides of the chosen table, with their labels, one opened beside
the current slide on click). Routes are checked over HTTP too: a run that is not on the slide and an unknown slide
are 404s, a bad run name a 400.

The view with the heat map and a measuring line is screenshotted into the test's temporary folder
(`viewer_slide.png`); set `CYTORETRIEVE_SLIDE_SCREENSHOT=PATH` to also write it there (docs/viewer_slide.png is made
so).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.ids import tile_id
from cytoretrieve.store import scores
from cytoretrieve.store.filters import equals
from cytoretrieve.store.tables import Store
from helpers.browser import SLIDE, loopback_page, needs_chromium, serving_slides, slide_store
from helpers.paths import SVS
from helpers.synthetic_slides import CELL_TILES, TILE_L0, write_standard_slide

SYNTHETIC = {"syn-a": ("NILM", 0.0), "syn-b": ("NILM", 0.1), "syn-c": ("HSIL", 3.0)}  # label, vector offset
RUN = "focus-demo"

pytestmark = needs_chromium


def _save_demo_run(store: Store) -> int:
    """A saved run over CMU-1-Small-Region's kept tiles whose tile score is the tile's stored focus (coverage where
    a tile has none): real per-tile values, so the heat map shows structure. Returns the tiles saved."""
    from cytoretrieve.views.web.slides import tile_tables

    (table,) = [t for t in tile_tables(store) if t.name == "cmu"]
    columns = ["id", "x", "y", "extent", "coverage"] + (["focus"] if "focus" in table.columns else [])
    rows = table.read(columns, equals("slide", SLIDE)).to_pylist()
    tiles = [{"slide": SLIDE, "tile_id": r["id"], "x": r["x"], "y": r["y"], "side": r["extent"], "tile_size": r["extent"],
              "score": float(r.get("focus") if r.get("focus") is not None else r["coverage"]), "slide_score": 0.5,
              "fold": 0} for r in rows]
    scores.save_scores(store, RUN, "cmu", table.version, "focus (demo)", tiles)
    return len(tiles)


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("slide_tools")
    store = slide_store(tmp)
    assert run(["tile", str(SVS), "--store", store.uri, "--table", "cmu"]) == 0
    saved = _save_demo_run(store)
    pyramid = write_standard_slide(tmp / "standard.tiff")
    for name in SYNTHETIC:
        (tmp / f"{name}.tiff").symlink_to(pyramid)
        assert run(["tile", str(tmp / f"{name}.tiff"), "--store", store.uri, "--table", "syn"]) == 0
    vectors = store.create_or_open("syn_vec", {"arch": "test", "fingerprint": "f", "dim": 8}, {"name": "syn"})
    rng = np.random.default_rng(0)
    records, x = [], []
    for name, (label, offset) in SYNTHETIC.items():
        for tx, ty in sorted(CELL_TILES):
            records.append({"id": tile_id(name, tx, ty, TILE_L0), "dataset": "syn", "slide": name, "group": name,
                            "label": label, "binary": int(label != "NILM"), "x": tx, "y": ty, "level": 1,
                            "tile_size": 320, "mpp": 0.5})
            x.append(rng.normal(size=8) * 0.1 + np.r_[1.0, offset, np.zeros(6)])
    vectors.add(vectors.make_rows(records, np.asarray(x, np.float32)))
    vectors.finish()
    with serving_slides(store) as url:
        yield url, store, saved


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_score_and_similar_routes(served) -> None:
    url, _, saved = served
    status, found = _get(f"{url}/api/slides/{SLIDE}/scores")
    assert status == 200 and [(r["run"], r["slide_tiles"]) for r in found["runs"]] == [(RUN, saved)]
    status, layer = _get(f"{url}/api/slides/{SLIDE}/scores/{RUN}")
    assert status == 200 and len(layer["tiles"]) == saved and layer["lo"] <= layer["hi"] and not layer["truncated"]
    assert all(len(t) == 4 and t[2] > 0 for t in layer["tiles"])
    assert _get(f"{url}/api/slides/syn-a/scores")[1]["runs"] == []
    for path, code in ((f"/api/slides/syn-a/scores/{RUN}", 404), (f"/api/slides/{SLIDE}/scores/no-such-run", 404),
                       (f"/api/slides/{SLIDE}/scores/bad%20name", 400),
                       ("/api/tables/syn_vec/slides/no-such-slide/similar", 404),
                       ("/api/tables/no_table/slides/syn-a/similar", 404),
                       ("/api/tables/syn_vec/slides/syn-a/similar?signature=nope", 400)):
        status, body = _get(url + path)
        assert status == code and "\n" not in body["detail"], (path, status, body)
    status, near = _get(f"{url}/api/tables/syn_vec/slides/syn-a/similar?signature=mean&k=5")
    assert status == 200 and [(h["slide"], h["label"]) for h in near["hits"]] == [("syn-b", "NILM"), ("syn-c", "HSIL")]
    assert near["hits"][0]["score"] > near["hits"][1]["score"] and near["label"] == "NILM"


def _painted(page) -> int:  # noqa: ANN001
    return page.evaluate("""() => {
      const c = window.cytoSlides.panes.hit.canvas, d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;
    }""")


def _drawn(page, pane: str = "hit") -> dict:  # noqa: ANN001
    return page.evaluate("(n) => JSON.parse(window.cytoSlides.panes[n].canvas.dataset.drawn || '{}')", pane)


def test_measure_heat_map_and_similar_slides_in_the_browser(served, tmp_path: Path) -> None:
    url, store, saved = served
    full = "(n) => window.cytoSlides.panes[n] && window.cytoSlides.panes[n].fullAt !== null"
    with loopback_page(url) as page:
        page.goto(url)
        page.wait_for_selector("#table option[value='syn_vec']", state="attached")
        page.select_option("#table", "syn_vec")
        page.evaluate(f"window.slideView.open({{slide: '{SLIDE}', x: 1000, y: 700, side: 224, rank: 1, label: null}}, null)")
        page.wait_for_function(full, arg="hit")
        page.wait_for_selector("#score-control:not([hidden])")

        # the heat map: choosing the saved run fills the scored tiles, with a legend of the run's scale
        before = _painted(page)
        page.select_option("#score-run", RUN)
        page.wait_for_function("() => JSON.parse(window.cytoSlides.panes.hit.canvas.dataset.drawn).scores > 0")
        page.wait_for_timeout(300)
        assert page.is_visible("#score-legend") and page.inner_text("#score-lo") and page.inner_text("#score-hi")
        drawn = _drawn(page)
        assert 0 < drawn["scores"] <= saved
        heat = _painted(page)
        assert heat > before + 2000
        page.fill("#overlay-opacity", "0")  # the opacity slider applies to the heat map
        page.dispatch_event("#overlay-opacity", "input")
        assert _painted(page) < heat - 2000
        page.fill("#overlay-opacity", "60")
        page.dispatch_event("#overlay-opacity", "input")

        # the measuring tool: a line dragged between two known points of the viewport
        page.click("#measure")
        box = page.locator("#osd-hit").bounding_box()
        (ax, ay), (bx, by) = (box["x"] + 260, box["y"] + 140), (box["x"] + 620, box["y"] + 330)
        centre = page.evaluate("() => { const v = window.cytoSlides.panes.hit.viewer.viewport; return v.getCenter(true); }")
        page.mouse.move(ax, ay)
        page.mouse.down()
        page.mouse.move(bx, by, steps=12)
        page.mouse.up()
        page.wait_for_selector("#measure-length:not([hidden])")
        view = page.evaluate("""() => { const p = window.cytoSlides.panes.hit, v = p.viewer.viewport;
          return {zoom: v.viewportToImageZoom(v.getZoom(true)), mpp: p.info.mpp, c: v.getCenter(true)}; }""")
        expected = math.hypot(bx - ax, by - ay) / view["zoom"] * view["mpp"]
        shown = float(page.get_attribute("#measure-length", "data-um"))
        text = page.inner_text("#measure-length")
        assert shown == pytest.approx(expected, rel=0.02) and "µm" in text
        assert float(text.split()[0].replace(",", "")) == pytest.approx(expected, rel=0.02)
        assert view["c"] == pytest.approx(centre, abs=1e-6)  # the drag measured, it did not pan
        page.click("#slide-centre")  # the line stays on the slide while the view moves
        page.wait_for_timeout(800)
        shot = tmp_path / "viewer_slide.png"
        page.locator("#slide-view").screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("CYTORETRIEVE_SLIDE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["CYTORETRIEVE_SLIDE_SCREENSHOT"])
        page.keyboard.press("Escape")
        page.wait_for_selector("#measure-length", state="hidden")
        assert page.evaluate("() => window.cytoSlides.panes.hit.measure === null && !window.cytoSlides.view.measuring")
        page.evaluate("() => { window.cytoSlides.panes.hit.info.mpp = null; }")  # a slide without a pixel size: px
        page.click("#measure")
        page.mouse.move(ax, ay)
        page.mouse.down()
        page.mouse.move(bx, ay, steps=8)
        page.mouse.up()
        page.wait_for_selector("#measure-length:not([hidden])")
        zoom = page.evaluate("() => { const v = window.cytoSlides.panes.hit.viewer.viewport; return v.viewportToImageZoom(v.getZoom(true)); }")
        assert page.inner_text("#measure-length").endswith(" px") and page.get_attribute("#measure-length", "data-um") is None
        assert float(page.get_attribute("#measure-length", "data-px")) == pytest.approx((bx - ax) / zoom, rel=0.02)
        page.keyboard.press("Escape")
        page.wait_for_selector("#measure-length", state="hidden")

        # slides like this slide: the nearest of the chosen table, labelled; a click opens one beside
        page.evaluate("window.slideView.open({slide: 'syn-a', x: 1920, y: 640, side: 640, rank: 1, label: null}, null)")
        page.wait_for_function("() => window.cytoSlides.panes.hit.info.slide === 'syn-a'")
        page.wait_for_function(full, arg="hit")
        assert page.is_hidden("#score-control")  # no run was saved on this slide
        page.select_option("#similar-signature", "mean")
        page.click("#similar")
        page.wait_for_selector("#similar-list .similar-hit")
        hits = page.locator("#similar-list .similar-hit")
        assert hits.count() == 2
        assert "syn-b" in hits.nth(0).inner_text() and "NILM" in hits.nth(0).inner_text()
        assert "syn-c" in hits.nth(1).inner_text() and "HSIL" in hits.nth(1).inner_text()
        hits.nth(1).click()
        page.wait_for_function("() => window.cytoSlides.panes.query && window.cytoSlides.panes.query.info && "
                               "window.cytoSlides.panes.query.info.slide === 'syn-c'")
        page.wait_for_function(full, arg="query")
        assert page.is_visible("#pane-query") and "syn-c" in page.inner_text("#query-caption")
        assert page.evaluate("() => window.cytoSlides.panes.query.tilesLoaded > 0 && window.cytoSlides.panes.query.tilesFailed === 0")
