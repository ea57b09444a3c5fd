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
    lines = [f"#{rank}  sim {hit.score:.4f}{percentile_words(hit)}", f"{hit.label or '(no label)'} - {hit.binary_name}"]
    if hit.slide is not None:
        lines += [hit.slide, f"at x {hit.x}, y {hit.y}"]
    else:
        lines.append(hit.id)
    return lines


def percentile_words(hit: Hit) -> str:
    """" (pct 62)": the similarity's percentile among the table's nearest-neighbour similarities ("" without)."""
    return "" if hit.percentile is None else f" (pct {hit.percentile:.0f})"


SIMILARITY_MEANING = ("pct: the similarity's percentile among the table's nearest-neighbour similarities "
                      "(50 = as close as a typical stored row to its own nearest neighbour)")


def majority_words(result: SearchResult) -> str | None:
    """The neighbours' vote in words: "majority CIS (4 of 5)", or "no majority: LD, MD, SD tied (1 each)" for a
    tie; None when no hit is labelled."""
    if result.majority_label is None:
        return None
    counts = result.label_counts()
    if result.is_tie:
        return f"no majority: {', '.join(result.tied or [])} tied ({counts[result.majority_label]} each)"
    return f"majority {result.majority_label} ({counts[result.majority_label]} of {len(result.hits)})"


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
