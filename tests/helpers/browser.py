"""What the browser tests of the slide viewer share: the system Chromium (Debian's package, driven by Playwright
without downloading a browser), a store for the real CMU-1-Small-Region slide, the viewer served over it with its
slide views, and a page that may reach nothing but that server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from cytoretrieve.store.tables import Store
from helpers.paths import SVS

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)
TIMEOUT_MS = 60_000
SLIDE = SVS.stem  # CMU-1-Small-Region, as the tile job names it
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install -y chromium; "
                                                             ".ci/run does)")


def slide_store(folder: Path) -> Store:
    """An empty store in `folder`/store for a browser test on the CMU slide; skips the test where Playwright or the
    slide is missing (before the caller spends time filling the store)."""
    pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")
    if not SVS.exists():
        pytest.skip(f"{SVS} not found")
    return Store(folder / "store")


@contextmanager
def serving_slides(store: Store, reader: bool = False) -> Iterator[str]:
    """The base URL of the viewer over `store` with its slide views (Deep Zoom tiles opened from each slide's
    recorded path), served on loopback until the block ends; with `reader`, tiles also open large from their slide,
    as `cytoretrieve serve` does."""
    from cytoretrieve.sources.slides.backends import open_slide_file
    from cytoretrieve.sources.slides.reader import SlideReader
    from cytoretrieve.views.web.app import create_app
    from helpers.viewer_server import serving

    row_reader = SlideReader().read_row if reader else None
    with serving(create_app(store.uri, reader=row_reader, slide_opener=open_slide_file)) as url:
        yield url


@contextmanager
def loopback_page(url: str) -> Iterator[Any]:
    """A headless Chromium page (1400 x 1000, the test timeout) on which every request to a host other than `url`'s
    is aborted; when the block ends without an error, the browser is closed and neither such a request nor a page
    error may have happened. The page is not yet at `url`: the caller adds its own listeners first."""
    from playwright.sync_api import sync_playwright

    host = urlparse(url).hostname
    outside: list[str] = []
    errors: list[str] = []

    def route(r) -> None:  # noqa: ANN001 - every request of the page: only loopback may be reached
        if urlparse(r.request.url).hostname != host and not r.request.url.startswith(("data:", "blob:")):
            outside.append(r.request.url)
            r.abort()
        else:
            r.continue_()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.route("**/*", route)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        browser.close()
    assert outside == [] and errors == []
