"""Labelling in the viewer page, end to end in headless Chromium (Debian's package, driven by Playwright): the
reviewer's name asked once and kept, a hit labelled with a key, two rows shift-clicked and labelled in one action,
points lassoed on the table's 2-D map and labelled in one action, undone (button, then Ctrl-Z), the disagreement
badge and view, a row's history panel, the next-to-review queue; the label log checked in the store after each step
(every event stored once, an undo is an event); no request leaves 127.0.0.1.

The labelling view is screenshotted into the test's temporary folder (`viewer_labels.png`); set
`CYTORETRIEVE_LABELS_SCREENSHOT=PATH` to also write it there (docs/viewer_labels.png is made so).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cytoretrieve.store.labels import read_events, table_classes
from cytoretrieve.store.tables import Store
from helpers.herlev_subset import TABLE, herlev_store

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)
TIMEOUT_MS = 60_000
K = 8
CANVAS = (640, 340)  # the map canvas' drawing size (index.html); labels.js pads points by PAD px
PAD = 12

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install -y chromium; .ci/run does)")


@pytest.fixture(scope="module")
def served(tmp_path_factory, herlev_root):  # noqa: ANN001, ANN201
    pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")
    from cytoretrieve.views.web.app import create_app
    from helpers.viewer_server import serving

    store: Store = herlev_store(herlev_root, tmp_path_factory.mktemp("labels_browser"), per_class=6)
    with serving(create_app(store.uri)) as url:
        yield url, store


@pytest.fixture()
def page(served):  # noqa: ANN001, ANN201
    from playwright.sync_api import sync_playwright

    url, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        requests: list[tuple[str, str, str | None]] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("request", lambda r: requests.append((r.method, r.url, r.post_data)))
        pg.requests = requests
        pg.goto(url)
        yield pg
        browser.close()
        assert errors == []
        outside = [u for _, u, _ in requests if not u.startswith((url + "/", "data:", "blob:"))]
        assert outside == []


def _events(store: Store) -> list[dict]:
    return read_events(store, TABLE).to_pylist()


def _posts(page, path: str) -> list[dict]:  # noqa: ANN001
    return [json.loads(body) for method, u, body in page.requests if method == "POST" and u.split("?")[0].endswith(path)]


def _hit(row: str) -> str:
    return f"#results .hit[data-id='{row}']"


def test_label_select_lasso_undo_history(page, served, tmp_path: Path) -> None:  # noqa: ANN001, PLR0915
    url, store = served
    classes = table_classes(store, TABLE)[0]
    page.wait_for_selector(f"#table option[value='{TABLE}']", state="attached")
    page.wait_for_selector("#browse img.cell")
    page.wait_for_function("document.getElementById('map-note').textContent.startsWith('pca')")
    keys = page.locator("#label-keys .label-key").all_inner_texts()
    assert keys[0].split() == ["1", classes[0]] and keys[-1].split() == ["0", "unsure"] and len(keys) == len(classes) + 1

    # the reviewer's name: asked once, kept in the page (a reload does not ask again)
    assert page.is_visible("#reviewer-input")
    page.fill("#reviewer-input", "ana")
    page.click("#reviewer-save")
    assert page.inner_text("#reviewer-name") == "ana" and page.is_hidden("#reviewer-ask")
    page.reload()
    page.wait_for_selector("#browse img.cell")
    assert page.is_hidden("#reviewer-ask") and page.inner_text("#reviewer-name") == "ana"

    # a hit labelled with a key: point at it, press the key of a class other than its stored one
    page.fill("#k", str(K))
    page.locator("#browse img.cell").first.click()
    page.wait_for_function(f"document.querySelectorAll('#results .hit').length === {K}")
    hits = page.locator("#results .hit").evaluate_all("hs => hs.map(h => [h.dataset.id, h.querySelector('.label').textContent])")
    one, stored = hits[1]
    key = next(i for i, c in enumerate(classes[:9]) if c != stored)
    page.hover(_hit(one))
    assert page.inner_text("#label-target") == one
    page.keyboard.press(str(key + 1))
    page.wait_for_selector(f"{_hit(one)} .review-badge.disagrees")
    assert page.inner_text(f"{_hit(one)} .review-badge") == f"{stored} → {classes[key]}"
    events = _events(store)
    assert [(e["row_id"], e["label"], e["reviewer"], e["action"]) for e in events] == [(one, classes[key], "ana", "label")]

    # two hits shift-clicked (the page's own click, opening it large, does not happen) and labelled in one action
    pair = [hits[2][0], hits[3][0]]
    for row in pair:
        page.click(_hit(row), modifiers=["Shift"])
    assert page.locator("#results .hit.selected").count() == 2 and page.is_hidden("#compare")
    assert page.inner_text("#label-target") == "the 2 selected row(s)"
    page.keyboard.press("0")  # unsure
    page.wait_for_function("document.querySelectorAll('#results .hit.selected').length === 0 && "
                           "document.querySelectorAll('#results .hit .review-badge').length === 3")
    posts = _posts(page, "/labels")
    assert [sorted(i["id"] for i in p["labels"]) for p in posts] == [[one], sorted(pair)]
    assert sorted(e["row_id"] for e in _events(store) if e["label"] == "unsure") == sorted(pair)

    # a lasso on the map: the points drawn inside a rectangle around the left part of the map
    answer = page.evaluate(f"fetch('/api/tables/{TABLE}/map?method=pca').then(r => r.json())")
    assert answer["points"] == answer["total"] == len(answer["ids"])
    def screen(x: float, y: float) -> tuple[float, float]:
        box = page.locator("#map-canvas").bounding_box()  # where the map is now (panels above it open and close)
        px, py = PAD + x * (CANVAS[0] - 2 * PAD), CANVAS[1] - PAD - y * (CANVAS[1] - 2 * PAD)
        return box["x"] + px * box["width"] / CANVAS[0], box["y"] + py * box["height"] / CANVAS[1]

    cut = sorted(answer["x"])[len(answer["x"]) // 4] + 1e-4  # about a quarter of the points, the leftmost
    inside = sorted(i for i, x in zip(answer["ids"], answer["x"]) if x < cut)
    corners = [screen(-0.02, -0.02), screen(cut, -0.02), screen(cut, 1.02), screen(-0.02, 1.02), screen(-0.02, -0.01)]
    page.mouse.move(*corners[0])
    page.mouse.down()
    for corner in corners[1:]:
        page.mouse.move(*corner, steps=6)
    page.mouse.up()
    assert page.inner_text("#label-target") == f"the {len(inside)} selected row(s)"
    lassoed = classes[(key + 1) % min(len(classes), 9)]
    page.keyboard.press(str((key + 1) % min(len(classes), 9) + 1))
    page.wait_for_function(f"document.getElementById('label-status').textContent === '{len(inside)} row(s) labelled {lassoed}'")
    assert sorted(i["id"] for i in _posts(page, "/labels")[-1]["labels"]) == inside
    assert len(_events(store)) == 3 + len(inside)

    # undo: the button undoes the lasso's rows in one request, Ctrl-Z the shift-clicked pair's; both are events
    page.click("#label-undo")
    page.wait_for_function("document.getElementById('label-status').textContent.startsWith('undone')")
    page.keyboard.press("Control+z")
    page.wait_for_function("document.getElementById('label-status').textContent === "
                           "'undone: 2 row(s) back to their previous review'")
    assert [sorted(p["ids"]) for p in _posts(page, "/labels/undo")] == [inside, sorted(pair)]
    events = _events(store)
    assert len(events) == 3 + 2 * len(inside) + 2 and len({e["event"] for e in events}) == len(events)
    undos = [e for e in events if e["action"] == "undo"]
    assert sorted(e["row_id"] for e in undos) == sorted(inside + pair)
    assert all(e["supersedes"] for e in undos)
    current = page.evaluate(f"fetch('/api/tables/{TABLE}/labels').then(r => r.json())")
    reviewed = {r["id"]: r["label"] for r in current["reviews"]}
    assert reviewed.get(one) == classes[key] and not set(pair) & set(reviewed)  # the lasso may have taken `one` too
    page.wait_for_function("document.querySelectorAll('#results .hit .review-badge').length === 1")
    assert page.is_visible(f"{_hit(one)} .review-badge.disagrees")

    # the disagreements view and a row's history (opening a hit large shows it)
    page.click("#disagree-open")
    page.wait_for_selector(f"#review-items .review-item[data-id='{one}'] .review-badge.disagrees")
    assert page.locator("#review-items .review-item").count() == 1
    page.click(_hit(pair[0]))
    page.wait_for_function(f"document.getElementById('history-id').textContent === {pair[0]!r}")
    history = [r.split("\t") for r in page.locator("#history-body table.history tbody tr").all_inner_texts()]
    logged = [e for e in _events(store) if e["row_id"] == pair[0]]  # 2 events, or 4 when the lasso took it too
    assert [h[1:4] for h in history] == [[e["action"], e["label"] or "(none)", "ana"] for e in logged]
    assert history[0][1:3] == ["label", "unsure"] and history[-1][1:3] == ["undo", "(none)"]

    # the next-to-review queue: point at its first row, label it, the next unreviewed row is the one a key labels
    page.click("#queue-open")
    page.wait_for_function("document.getElementById('review-list-title').textContent === 'Next to review'")
    queue = page.locator("#review-items .review-item").evaluate_all("items => items.map(i => i.dataset.id)")
    assert len(queue) > 2 and not set(queue) & set(reviewed)
    page.hover(f"#review-items .review-item[data-id='{queue[0]}']")
    page.mouse.move(5, 5)  # away: the row pointed at stays the one a key labels
    page.keyboard.press("1")
    page.wait_for_selector(f"#review-items .review-item[data-id='{queue[0]}'] .review-badge")
    page.wait_for_function(f"document.getElementById('label-target').textContent === {queue[1]!r}")
    assert _events(store)[-1]["row_id"] == queue[0]

    # the labelling view for a reviewer: a selection (two hits, a lasso on the map), badges, the history panel
    page.click("#review-list-close")
    page.click("#large-close")
    for row in (hits[5][0], hits[6][0]):
        page.click(_hit(row), modifiers=["Shift"])
    page.mouse.move(*screen(cut, -0.02))
    page.keyboard.down("Shift")  # a lasso with shift adds to the selection (without, it replaces it)
    page.mouse.down()
    for corner in (screen(1.02, -0.02), screen(1.02, 0.5), screen(cut, 0.5), screen(cut, -0.01)):
        page.mouse.move(*corner, steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")
    assert page.locator("#results .hit.selected").count() >= 2 and "lasso: 0 point" not in page.inner_text("#label-status")
    page.hover(_hit(one))
    page.keyboard.press("h")
    page.wait_for_function(f"document.getElementById('history-id').textContent === {one!r}")
    page.wait_for_function("[...document.querySelectorAll('img')].every(i => !i.src || i.complete)")
    shot = tmp_path / "viewer_labels.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("CYTORETRIEVE_LABELS_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CYTORETRIEVE_LABELS_SCREENSHOT"])
