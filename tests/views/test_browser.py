"""The viewer page end to end in headless Chromium (Debian's package, driven by Playwright without downloading a
browser): choose the Herlev table, upload a Herlev cell, see k labelled results, open a hit large beside the query
and search by it, filter by label, browse the stored rows by page, then switch to a tile table (nothing of the
previous query stays, the words say tiles), see the hits and the query on the slide overview, open a tile large
(read at full resolution from its slide), check nothing overlaps and download the GeoJSON.

The results page is screenshotted into the test's temporary folder (`viewer.png`) for a reviewer; set
`CYTORETRIEVE_SCREENSHOT=PATH` to also write it there (docs/viewer.png is made so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cytoretrieve.sources.slides.annotations import read_geojson
from cytoretrieve.store.tables import Store
from helpers.herlev_subset import TABLE, TILE_TABLE, add_tiles, herlev_store

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)
HERLEV_CODES = {"NS", "NI", "NC", "LD", "MD", "SD", "CIS"}
K = 8
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install -y chromium; .ci/run does)")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, herlev_root):  # noqa: ANN001, ANN201
    pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")
    from cytoretrieve.sources.slides.backends import open_slide_file
    from cytoretrieve.sources.slides.reader import SlideReader
    from cytoretrieve.views.web.app import create_app
    from helpers.viewer_server import serving

    store: Store = herlev_store(herlev_root, tmp_path_factory.mktemp("browser"))
    add_tiles(store)
    with serving(create_app(store.uri, reader=SlideReader().read_row, slide_opener=open_slide_file)) as url:
        yield url


@pytest.fixture()
def page(base_url: str):  # noqa: ANN201
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(base_url)
        yield pg
        browser.close()
        assert errors == []


def _labels(page) -> list[str]:  # noqa: ANN001
    return page.locator("#results .hit .label").all_inner_texts()


def _no_overlaps(page) -> None:  # noqa: ANN001
    """No two hit cards, no rank badge and the slide name above its overview, no two compare panels overlap."""
    boxes = page.evaluate("""() => {
      const r = (e) => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
      return {
        cards: [...document.querySelectorAll('#results .hit')].map(r),
        figures: [...document.querySelectorAll('#compare figure')].map(r),
        titles: [...document.querySelectorAll('.overview > div:first-child')].map(r),
        badges: [...document.querySelectorAll('.overview .mark span')].map(r),
      };
    }""")

    def cross(a: list[float], b: list[float]) -> bool:
        return a[0] < b[2] - 1 and b[0] < a[2] - 1 and a[1] < b[3] - 1 and b[1] < a[3] - 1

    for group in ("cards", "figures"):
        items = boxes[group]
        assert not any(cross(a, b) for i, a in enumerate(items) for b in items[i + 1:]), group
    assert not any(cross(t, b) for t in boxes["titles"] for b in boxes["badges"])


def test_upload_click_filter_and_download(page, herlev_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    page.wait_for_selector(f"#table option[value='{TABLE}']", state="attached")
    page.select_option("#table", TABLE)
    page.wait_for_selector("#browse img.cell")
    page.fill("#k", str(K))
    cell = sorted((herlev_root / "carcinoma_in_situ").iterdir())[0]
    page.set_input_files("#file", str(cell))
    page.wait_for_function(f"document.querySelectorAll('#results .hit').length === {K}")
    assert set(_labels(page)) <= HERLEV_CODES
    assert page.locator("#results .hit").first.get_attribute("data-id") == f"carcinoma_in_situ/{cell.name}"
    assert "neighbours' labels" in page.inner_text("#counts")
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    second = page.locator("#results .hit").nth(1)
    clicked = second.get_attribute("data-id")
    second.click()  # opens it large beside the query: its source image, looked up by id
    page.wait_for_selector("#compare:not([hidden])")
    page.wait_for_function("document.getElementById('large-picture').complete && "
                           "document.getElementById('large-picture').naturalWidth > 0")
    assert clicked in page.inner_text("#large-caption")
    assert page.evaluate("document.getElementById('compare-query').src.startsWith('blob:')")
    page.click("#large-search")  # then searched by
    page.wait_for_function(f"document.getElementById('query-name').textContent === {clicked!r}")
    assert page.is_hidden("#compare")
    page.wait_for_function(f"document.querySelectorAll('#results .hit').length === {K} && "
                           f"![...document.querySelectorAll('#results .hit')].some(h => h.dataset.id === {clicked!r})")

    page.select_option("#filter-label", "NS")
    page.wait_for_function("[...document.querySelectorAll('#results .hit .label')].every(l => l.textContent === 'NS')"
                           f" && document.querySelectorAll('#results .hit').length === {K}")
    assert set(_labels(page)) == {"NS"}

    page.select_option("#filter-label", "")
    page.wait_for_function("document.getElementById('browse-total').textContent.includes('of 84')")
    assert page.inner_text("#browse-total") == "(1–60 of 84)" and page.is_disabled("#page-prev")
    page.click("#page-next")  # the stored rows browse by page
    page.wait_for_function("document.getElementById('browse-total').textContent === '(61–84 of 84)'")
    assert page.locator("#browse img.cell").count() == 24 and page.is_disabled("#page-next")
    page.click("#page-prev")
    page.wait_for_function("document.getElementById('browse-total').textContent === '(1–60 of 84)'")

    page.select_option("#table", TILE_TABLE)
    page.wait_for_selector("#browse img.cell[data-id*='@']")  # the tile table's cells, not the previous table's
    # nothing of the Herlev query stays: picture, name, counts, hits, exports; the words are a tile table's
    assert page.is_hidden("#query-picture") and page.inner_text("#query-name") == ""
    assert page.is_hidden("#summary") and page.is_hidden("#export-csv") and page.inner_text("#counts") == ""
    assert page.locator("#results .hit").count() == 0 and "majority" not in page.inner_text("body")
    assert "Drop a tile image" in page.inner_text("#drop") and "Stored tiles" in page.inner_text("aside")
    assert "cell" not in page.inner_text("#status")
    page.locator("#browse img.cell").nth(5).click()
    page.wait_for_function(f"document.querySelectorAll('#results .hit').length === {K}")
    page.wait_for_selector(".overview .frame img")
    assert page.locator(".overview .mark:not(.query)").count() == K
    assert page.locator(".overview .mark.query").count() == 1  # the query marked on its overview
    page.locator("#results .hit").first.click()  # a tile large: read at full resolution from its slide
    page.wait_for_function("document.getElementById('large-picture').complete && "
                           "document.getElementById('large-picture').naturalWidth >= 320")
    _no_overlaps(page)
    page.wait_for_function("[...document.querySelectorAll('img')].every(i => !i.src || i.complete)")
    # the hit's slide opened beside the query: wait for its full-resolution tiles before the picture is taken
    page.wait_for_function("window.cytoSlides.panes.hit && window.cytoSlides.panes.hit.fullAt !== null")
    docs_shot = tmp_path / "viewer_large.png"
    page.screenshot(path=str(docs_shot), full_page=True)
    if os.environ.get("CYTORETRIEVE_SCREENSHOT"):
        shutil.copyfile(docs_shot, os.environ["CYTORETRIEVE_SCREENSHOT"])
    page.wait_for_function("document.querySelector('.overview .frame img').naturalWidth > 0")
    page.screenshot(path=str(tmp_path / "viewer_tiles.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#export-geojson")
    path = tmp_path / "hits.geojson"
    download.value.save_as(path)
    annotations, problems = read_geojson(path)
    assert problems == [] and len(annotations) == K
    ids = page.locator("#results .hit").evaluate_all("hits => hits.map(h => h.dataset.id)")
    assert [a.bbox[:2] for a in annotations] == [tuple(float(v) for v in i.split("@")[1].split(",")[:2]) for i in ids]
