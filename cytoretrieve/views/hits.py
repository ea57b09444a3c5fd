"""What every view says about a search hit, defined once: its caption, its binary colour, its CSV row and its
QuPath square. The HTML page, the contact sheet, the web app and `search --geojson` all use these.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cytoretrieve.views.geojson import NEGATIVE_COLOR, POSITIVE_COLOR, SlideSquare, class_color

if TYPE_CHECKING:
    from cytoretrieve.queries.search import Hit, SearchResult

BINARY_COLORS = {"positive": POSITIVE_COLOR, "negative": NEGATIVE_COLOR, "unknown": (127, 127, 127)}
CSV_COLUMNS = ["rank", "id", "similarity", "label", "binary", "dataset", "slide", "x", "y", "side", "group", "path"]


def hex_color(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def caption(hit: Hit, rank: int) -> list[str]:
    """Caption lines under a hit's picture: rank + similarity, label + binary class, and where it comes from."""
    lines = [f"#{rank}  sim {hit.score:.3f}", f"{hit.label or '(no label)'} - {hit.binary_name}"]
    if hit.slide is not None:
        lines.append(f"{hit.slide} @ {hit.x},{hit.y}")
    elif hit.dataset:
        lines.append(hit.dataset)
    return lines


def counts_line(result: SearchResult) -> str:
    """The neighbours' label counts in one line, most common first: "CIS 4 · SD 1"."""
    return ", ".join(f"{label} {n}" for label, n in result.label_counts().items()) or "no hits"


def hits_csv(result: SearchResult) -> str:
    """The hits as CSV text, best first (what the viewer's CSV export downloads)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rank, h in enumerate(result.hits, 1):
        writer.writerow([rank, h.id, f"{h.score:.6f}", h.label or "", h.binary_name, h.dataset or "", h.slide or "",
                         "" if h.x is None else h.x, "" if h.y is None else h.y, "" if h.side is None else h.side,
                         h.group or "", h.path or ""])
    return out.getvalue()


def hit_squares(result: SearchResult) -> list[SlideSquare]:
    """The hits that sit on a slide as QuPath squares: class = label, colour by label, similarity and rank measured.

    Cell hits (no slide position) are left out: QuPath objects need a place on a slide.
    """
    squares = []
    for rank, h in enumerate(result.hits, 1):
        if h.slide is None or h.x is None or h.y is None:
            continue
        side = h.side or h.tile_size or 1
        name = h.label or h.binary_name
        squares.append(SlideSquare(h.id, h.x, h.y, side, name, class_color(name),
                                   {"similarity": h.score, "rank": rank}))
    return squares
