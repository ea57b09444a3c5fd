"""`search --png`: the search as one contact-sheet image: the query first, then the hits in a grid, each with
its caption (rank, similarity and its percentile, label, binary class in its colour, slide and position for tiles)
under its picture. The title says what was searched where; the line under it the neighbours' labels. Captions wrap
(ids and slide names break at their separators) rather than being cut.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from cytoretrieve.views.hits import BINARY_COLORS, caption, counts_line, majority_words

if TYPE_CHECKING:
    from cytoretrieve.queries.search import SearchResult

CELL = 192  # px of each picture
COLUMNS = 6
PAD = 12
LINE = 16  # px per caption line
CAPTION_LINES = 5
HEADER = 60
BACKGROUND = (250, 250, 250)
QUERY_FRAME = (31, 119, 180)


def _picture(jpeg: bytes | None) -> Image.Image:
    """A stored thumbnail scaled to fit CELL x CELL on grey (a grey square when there is none)."""
    tile = Image.new("RGB", (CELL, CELL), (230, 230, 230))
    if jpeg:
        with Image.open(io.BytesIO(jpeg)) as im:
            scale = CELL / max(im.size)
            im = im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                          Image.BICUBIC)
            tile.paste(im, ((CELL - im.width) // 2, (CELL - im.height) // 2))
    return tile


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text` cut with an ellipsis to fit `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` broken into lines of at most `width` px, at spaces, slashes, @ and commas where it can, else anywhere."""
    lines: list[str] = []
    while text:
        if draw.textlength(text, font=font) <= width:
            lines.append(text)
            break
        n = len(text)
        while n > 1 and draw.textlength(text[:n], font=font) > width:
            n -= 1
        cut = max(text.rfind(c, 0, n) for c in " /@,_-")
        n = cut + 1 if cut > 0 else n
        lines.append(text[:n].rstrip())
        text = text[n:].lstrip()
    return lines


def _caption_lines(draw: ImageDraw.ImageDraw, lines: list[str], font: ImageFont.ImageFont) -> list[tuple[int, str]]:
    """(caption line index, text) of each wrapped line, at most CAPTION_LINES (the last one cut if it must be)."""
    out = [(i, part) for i, text in enumerate(lines) for part in _wrap(draw, text, font, CELL)]
    if len(out) > CAPTION_LINES:
        out = out[:CAPTION_LINES]
        out[-1] = (out[-1][0], _fit(draw, out[-1][1] + " …", font, CELL))
    return out


def render_contact_sheet(result: SearchResult, thumbnails: Mapping[str, bytes], query_picture: bytes | None
                         ) -> Image.Image:
    """The sheet as a PIL image; `thumbnails` {hit id: JPEG}, `query_picture` a JPEG of the query (or None)."""
    font = ImageFont.load_default(size=13)
    bold = ImageFont.load_default(size=16)
    n = len(result.hits) + 1
    cols = min(COLUMNS, n)
    rows = -(-n // cols)
    box_h = CELL + CAPTION_LINES * LINE + PAD
    sheet = Image.new("RGB", (PAD + cols * (CELL + PAD), HEADER + rows * box_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    query = result.query if result.query.startswith("id ") else Path(result.query).name or result.query
    title = f"{len(result.hits)} nearest to {query} in {result.table}"
    words = majority_words(result)
    subtitle = (f"neighbours' labels: {counts_line(result)}; {words}" if words else "the stored rows carry no labels")
    draw.text((PAD, 10), _fit(draw, title, bold, sheet.width - 2 * PAD), fill=(20, 20, 20), font=bold)
    draw.text((PAD, 32), _fit(draw, subtitle, font, sheet.width - 2 * PAD), fill=(60, 60, 60), font=font)
    items = [(query_picture, ["query", query], QUERY_FRAME)]
    items += [(thumbnails.get(h.id), caption(h, r), BINARY_COLORS[h.binary_name]) for r, h in enumerate(result.hits, 1)]
    for i, (jpeg, lines, colour) in enumerate(items):
        x, y = PAD + (i % cols) * (CELL + PAD), HEADER + (i // cols) * box_h
        sheet.paste(_picture(jpeg), (x, y))
        draw.rectangle((x - 2, y - 2, x + CELL + 1, y + CELL + 1), outline=colour, width=3)
        for j, (which, text) in enumerate(_caption_lines(draw, lines, font)):
            fill = colour if which == 1 and i else (40, 40, 40)
            draw.text((x, y + CELL + 4 + j * LINE), text, fill=fill, font=font)
    return sheet


def write_contact_sheet(result: SearchResult, thumbnails: Mapping[str, bytes], query_picture: bytes | None,
                        path: str | Path) -> Path:
    """Write the sheet as a PNG to `path` (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_contact_sheet(result, thumbnails, query_picture).save(path, format="PNG", optimize=True)
    return path
