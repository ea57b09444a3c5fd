"""`search --png`: the search as one contact-sheet image: the query first, then the hits in a grid, each with
its caption (rank, similarity, label, binary class in its colour, slide position for tiles) under its picture.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from cytoretrieve.views.hits import BINARY_COLORS, caption, counts_line

if TYPE_CHECKING:
    from cytoretrieve.queries.search import SearchResult

CELL = 160  # px of each picture
COLUMNS = 6
PAD = 10
LINE = 16  # px per caption line
CAPTION_LINES = 3
HEADER = 44
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
    title = f"{len(result.hits)} nearest in {result.table}: {counts_line(result)}"
    draw.text((PAD, 12), _fit(draw, title, bold, sheet.width - 2 * PAD), fill=(20, 20, 20), font=bold)
    items = [(query_picture, ["query", Path(result.query).name or result.query], QUERY_FRAME)]
    items += [(thumbnails.get(h.id), caption(h, r), BINARY_COLORS[h.binary_name]) for r, h in enumerate(result.hits, 1)]
    for i, (jpeg, lines, colour) in enumerate(items):
        x, y = PAD + (i % cols) * (CELL + PAD), HEADER + (i // cols) * box_h
        sheet.paste(_picture(jpeg), (x, y))
        draw.rectangle((x - 2, y - 2, x + CELL + 1, y + CELL + 1), outline=colour, width=3)
        for j, text in enumerate(lines[:CAPTION_LINES]):
            fill = colour if j == 1 and i else (40, 40, 40)
            draw.text((x, y + CELL + 4 + j * LINE), _fit(draw, text, font, CELL), fill=fill, font=font)
    return sheet


def write_contact_sheet(result: SearchResult, thumbnails: Mapping[str, bytes], query_picture: bytes | None,
                        path: str | Path) -> Path:
    """Write the sheet as a PNG to `path` (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_contact_sheet(result, thumbnails, query_picture).save(path, format="PNG", optimize=True)
    return path
