"""`search --html`: one self-contained HTML page of a search (no network needed to open it).

The query picture, the neighbours' label counts, then the hits in a grid: thumbnail (inlined as a data URI),
rank and similarity, label, binary class (coloured: positive red, negative green, unknown grey), dataset, and for
tiles their slide and level-0 x/y. Every value is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cytoretrieve.views.hits import (
    BINARY_COLORS,
    SIMILARITY_MEANING,
    counts_line,
    hex_color,
    majority_words,
    percentile_words,
)

if TYPE_CHECKING:
    from cytoretrieve.queries.search import Hit, SearchResult

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.3rem}.counts{font-size:1.05rem;margin:.5rem 0 1rem}
.query{display:flex;gap:1rem;align-items:center;margin-bottom:1rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8rem}
.hit{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem;font-size:.82rem}
.hit img,.query img{width:100%;max-width:224px;aspect-ratio:1;object-fit:contain;background:#eee;display:block}
.pill{display:inline-block;padding:0 .4rem;border-radius:.6rem;color:#fff;font-size:.75rem}
.muted{color:#666}.id{word-break:break-all;color:#666;font-size:.72rem}
"""


def data_uri(jpeg: bytes | None) -> str:
    """A JPEG as a data: URI ('' for none)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else ""


def _img(jpeg: bytes | None, alt: str) -> str:
    return f'<img src="{data_uri(jpeg)}" alt="{html.escape(alt)}">' if jpeg else '<div class="muted">(no picture)</div>'


def _pill(name: str) -> str:
    return f'<span class="pill" style="background:{hex_color(BINARY_COLORS[name])}">{name}</span>'


def _hit_card(rank: int, hit: Hit, thumb: bytes | None) -> str:
    e = html.escape
    where = (f"{e(hit.slide)} @ {hit.x}, {hit.y}" if hit.slide is not None else e(hit.group or ""))
    return (f'<div class="hit" data-id="{e(hit.id)}">{_img(thumb, hit.id)}'
            f"<div><b>#{rank}</b> similarity <b>{hit.score:.3f}</b>{e(percentile_words(hit))}</div>"
            f"<div><b>{e(hit.label or '(no label)')}</b> {_pill(hit.binary_name)}</div>"
            f'<div class="muted">{e(hit.dataset or "")} {where}</div><div class="id">{e(hit.id)}</div></div>')


def render_search_page(result: SearchResult, thumbnails: Mapping[str, bytes], query_picture: bytes | None) -> str:
    """The page's HTML text; `thumbnails` {hit id: JPEG}, `query_picture` a JPEG of the query (or None)."""
    e = html.escape
    cards = "\n".join(_hit_card(r, h, thumbnails.get(h.id)) for r, h in enumerate(result.hits, 1))
    words = majority_words(result)
    majority = f" — <b>{e(words)}</b>" if words else ""
    meaning = (f'<div class="muted">{e(SIMILARITY_MEANING)}</div>'
               if any(h.percentile is not None for h in result.hits) else "")
    filt = f'<div class="muted">filter: {e(result.where)}</div>' if result.where else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cytoretrieve search: {e(result.query)}</title>
<style>{STYLE}</style></head><body>
<h1>{len(result.hits)} nearest in <code>{e(result.table)}</code></h1>
<div class="query">{_img(query_picture, "query")}<div><div>query: <b>{e(result.query)}</b></div>{filt}</div></div>
<div class="counts">neighbours' labels: {e(counts_line(result))}{majority}</div>{meaning}
<div class="grid">
{cards}
</div></body></html>
"""


def write_search_page(result: SearchResult, thumbnails: Mapping[str, bytes], query_picture: bytes | None,
                      path: str | Path) -> Path:
    """Write the page to `path` (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_search_page(result, thumbnails, query_picture), encoding="utf-8")
    return path
