"""Per-slide heat maps of out-of-fold tile scores over the slide thumbnail (`cytoretrieve score `out` DIR`).

A slide score says *whether* a slide looks positive; the heat map shows *where* the model looked. Each slide of a
cross-validated run gets `DIR/heatmaps/<slide>.png`: its thumbnail (about `LONG_SIDE` px on the long side, read with
the slide's overview stored in the store at tiling time: a heat map never reopens a slide file), every tile a semi-transparent square coloured by its
out-of-fold tile score, a colour bar, and a title (slide, label, fold, slide score, method and what the colour
means). The colour scale is shared by every slide of the run (the 1st-99th percentile of all tile scores), so
maps compare across slides.

What a tile score is depends on the method: for `abmil` / `gated` the attention weight, shown multiplied by the
slide's tile count (1 = uniform attention: softmax weights sum to 1 per slide, so raw weights would make large
slides look cold); for `mean` / `max` / `topk` the instance logit; for `retrieval` the similarity to positives
minus the similarity to negatives.

Geometry comes from the vector table (one filtered read per slide): level-0 `x`, `y` and the tile's level-0 side,
parsed from the tile id (`slide@x,y,extent`, see `ids.py`), else `tile_size * mpp / slide mpp`. A slide without
a stored overview (tiled before overviews were stored, or vectors imported from elsewhere) has its tiles drawn on
a plain background spanning them, and a note says so. Tables without tile coordinates (MIL benchmark tables, cell tables) get no maps, only a note.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cytoretrieve.store.filters import HAS_LOCATION, equals

if TYPE_CHECKING:
    from PIL import Image

    from cytoretrieve.queries.mil.bags import Bags
    from cytoretrieve.queries.mil.evaluate import CVResult
    from cytoretrieve.store.tables import VectorTable

LONG_SIDE = 1024  # thumbnail px on its long side
TITLE_PX = 58  # band above the thumbnail: three lines of text
BAR_PX = 96  # band right of the thumbnail: the colour bar and its labels
BAR_WIDTH = 18
ALPHA = 0.5  # opacity of the tile colours over the thumbnail
CMAP = "turbo"
PLAIN_BACKGROUND = (242, 242, 242)
PERCENTILES = (1.0, 99.0)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

MEANING = {
    "abmil": "attention weight x tiles in the slide (1 = uniform)",
    "gated": "gated attention weight x tiles in the slide (1 = uniform)",
    "mean": "instance logit (classifier on the tile embedding)",
    "max": "instance logit (classifier on the tile embedding)",
    "topk": "instance logit (classifier on the tile embedding)",
    "retrieval": "similarity to positives - similarity to negatives",
}


def display_scores(method: str, scores: Sequence[float]) -> np.ndarray:
    """The tile scores as coloured: attention weights times the slide's tile count, other scores as they are."""
    s = np.asarray(scores, dtype=np.float64)
    return s * len(s) if method in ("abmil", "gated") else s


def safe_names(names: Sequence[str]) -> dict[str, str]:
    """{slide: file stem}: characters other than letters, digits, `.`, `_`, `-` replaced; a name that had to change,
    or that would collide with another (case-insensitively), gets a short hash of the original appended."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        stem = _UNSAFE.sub("_", name).strip("._")[:120] or "slide"
        if stem != name or stem.lower() in used:
            stem = f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        n = 1
        base = stem
        while stem.lower() in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem.lower())
        out[name] = stem
    return out


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _lut(name: str = CMAP) -> np.ndarray:
    """(256, 3) uint8 colours of a matplotlib colour map."""
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def slide_tiles(table: VectorTable, group_column: str, slide: str) -> dict[str, dict[str, Any]]:
    """{tile id: row (x, y, tile_size, mpp)} of one slide's rows that have level-0 coordinates."""
    rows = table.read(["id", "x", "y", "tile_size", "mpp"], equals(group_column, slide)).to_pylist()
    return {r["id"]: r for r in rows if r["x"] is not None and r["y"] is not None}


def tile_extents(rows: dict[str, dict[str, Any]], slide_mpp: float | None) -> dict[str, float]:
    """Level-0 side of each tile: from its id, else tile_size * tile mpp / slide mpp, else tile_size."""
    from cytoretrieve.ids import parse_tile_id

    out = {}
    for tid, r in rows.items():
        parsed = parse_tile_id(tid)
        if parsed and parsed[1] == r["x"] and parsed[2] == r["y"]:
            out[tid] = float(parsed[3])
        elif r.get("tile_size") and r.get("mpp") and slide_mpp:
            out[tid] = float(r["tile_size"]) * float(r["mpp"]) / slide_mpp
        else:
            out[tid] = float(r.get("tile_size") or 1)
    return out


def _plain_background(x: np.ndarray, y: np.ndarray, e: np.ndarray) -> tuple[Image.Image, tuple[float, ...]]:
    """A blank picture spanning the tiles (for a slide without an overview) and its placement (ox, oy, fx, fy)."""
    from PIL import Image

    ox, oy = float(x.min()), float(y.min())
    w, h = float((x + e).max()) - ox, float((y + e).max()) - oy
    f = LONG_SIDE / max(w, h, 1.0)
    thumb = Image.new("RGB", (max(1, round(w * f)), max(1, round(h * f))), PLAIN_BACKGROUND)
    return thumb, (ox, oy, f, f)


def render(thumb: Image.Image, boxes: np.ndarray, values: np.ndarray, vmin: float, vmax: float,
           title: Sequence[str], lut: np.ndarray | None = None) -> Image.Image:
    """The heat map image: `thumb` at (0, TITLE_PX) with `boxes` (n, 4: x0, y0, x1, y1 in thumbnail px) coloured by
    `values` on [vmin, vmax] (overlaps show the highest), the colour bar on the right and `title` lines on top."""
    from PIL import Image, ImageDraw

    lut = _lut() if lut is None else lut
    base = np.asarray(thumb.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    level = np.full((h, w), -1, dtype=np.int16)
    idx = np.clip(np.round((values - vmin) / (vmax - vmin) * 255), 0, 255).astype(np.int16)
    for k in np.argsort(values, kind="stable"):  # higher scores painted last: they win overlaps
        x0, y0, x1, y1 = boxes[k]
        level[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = idx[k]
    covered = level >= 0
    base[covered] = (1 - ALPHA) * base[covered] + ALPHA * lut[level[covered]].astype(np.float32)

    font, small = _font(15), _font(12)
    lines = list(title[:3])
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((measure.textlength(t, font=font if i == 0 else small) for i, t in enumerate(lines)), default=0)
    canvas = Image.new("RGB", (max(w + BAR_PX, int(text_w) + 12), h + TITLE_PX), "white")  # narrow slides: room for the title
    canvas.paste(Image.fromarray(base.round().astype(np.uint8)), (0, TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 3 + 18 * i), line, fill=(0, 0, 0), font=font if i == 0 else small)
    # colour bar: top = vmax
    bar_h = max(32, min(h - 24, 400))
    bx, by = w + 10, TITLE_PX + 12
    ramp = lut[np.linspace(255, 0, bar_h).round().astype(int)]
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None, :], BAR_WIDTH, axis=1)), (bx, by))
    draw.rectangle([bx - 1, by - 1, bx + BAR_WIDTH, by + bar_h], outline=(0, 0, 0))
    for frac, v in ((0.0, vmax), (0.5, (vmin + vmax) / 2), (1.0, vmin)):
        ty = by + round(frac * (bar_h - 1))
        draw.line([bx + BAR_WIDTH, ty, bx + BAR_WIDTH + 4, ty], fill=(0, 0, 0))
        draw.text((bx + BAR_WIDTH + 6, ty - 7), f"{v:.3g}", fill=(0, 0, 0), font=small)
    return canvas


def write_heatmaps(table: VectorTable, result: CVResult, bags: Bags, folder: Path, *,
                   group_column: str = "slide") -> tuple[list[Path], list[str]]:
    """Write folder/heatmaps/<slide>.png for each slide of `result`; return (written files, notes).

    `table` is the vector table the bags were read from (grouped by `group_column`); tiles are placed by its
    level-0 `x`, `y`, over each slide's stored overview. Nothing is written for a table without tile coordinates (a
    note says so); a slide without an overview gets a plain background (and one note for all such slides).
    """
    folder = Path(folder)
    if not result.slides:
        return [], []
    if table.count(HAS_LOCATION) == 0:
        return [], [f"no heat maps: table '{table.name}' has no tile coordinates (x, y); heat maps need a tile "
                    "table (`cytoretrieve tile`, then `embed`)"]
    from cytoretrieve.store.overviews import read_overviews

    overviews = read_overviews(table.store, result.slides)
    lut = _lut()
    pos = {name: i for i, name in enumerate(bags.names)}
    shown = {s: display_scores(result.method, result.tile_scores.get(s, [])) for s in result.slides}
    every = np.concatenate([v[np.isfinite(v)] for v in shown.values()] + [np.zeros(0)])
    if not len(every):
        return [], ["no heat maps: the result holds no tile scores"]
    vmin, vmax = (float(v) for v in np.percentile(every, PERCENTILES))
    if not vmax > vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    meaning = MEANING.get(result.method, "tile score")
    stems = safe_names(result.slides)
    out_dir = folder / "heatmaps"
    written: list[Path] = []
    unopened: list[str] = []
    no_coords: list[str] = []
    mismatched: list[str] = []
    for slide, y, fold, score in zip(result.slides, result.y, result.fold_of, result.scores):
        values = shown[slide]
        ids = bags.ids[pos[slide]] if bags.ids is not None and slide in pos else None
        if ids is None or len(ids) != len(values):
            mismatched.append(slide)
            continue
        rows = slide_tiles(table, group_column, slide)
        keep = [i for i, t in enumerate(ids) if t in rows and np.isfinite(values[i])]
        if not keep:
            no_coords.append(slide)
            continue
        overview = overviews.get(slide)
        ext = tile_extents(rows, overview.mpp if overview else None)
        x = np.array([rows[ids[i]]["x"] for i in keep], dtype=np.float64)
        yy = np.array([rows[ids[i]]["y"] for i in keep], dtype=np.float64)
        e = np.array([ext[ids[i]] for i in keep], dtype=np.float64)
        if overview is not None:
            thumb = overview.picture()
            ox, oy, fx, fy = 0.0, 0.0, thumb.width / overview.width, thumb.height / overview.height
        else:
            unopened.append(slide)
            thumb, (ox, oy, fx, fy) = _plain_background(x, yy, e)
        x0 = np.round((x - ox) * fx).astype(int)
        y0 = np.round((yy - oy) * fy).astype(int)
        x1 = np.maximum(x0 + 1, np.round((x + e - ox) * fx).astype(int))
        y1 = np.maximum(y0 + 1, np.round((yy + e - oy) * fy).astype(int))
        title = [
            slide,
            f"label {y} ({'positive' if y else 'negative'})   fold {fold}   slide score {score:.4g}   "
            f"{result.method}   {len(keep)} tiles" + ("" if overview else "   (no stored overview: plain background)"),
            f"colour: {meaning}; scale shared by all slides ({PERCENTILES[0]:g}-{PERCENTILES[1]:g}th percentile)",
        ]
        image = render(thumb, np.stack([x0, y0, x1, y1], axis=1), values[keep], vmin, vmax, title, lut)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{stems[slide]}.png"
        image.save(target)
        written.append(target)
    notes = []
    if unopened:
        notes.append(f"heat maps: {len(unopened)} slide(s) have no overview in the store (e.g. {unopened[0]}; rerun "
                     "`cytoretrieve tile` on them to store one): their tiles are drawn on a plain background")
    if no_coords:
        notes.append(f"heat maps: {len(no_coords)} slide(s) without tile coordinates skipped (e.g. {no_coords[0]})")
    if mismatched:
        notes.append(f"heat maps: {len(mismatched)} slide(s) whose tile scores do not match their tiles skipped "
                     f"(e.g. {mismatched[0]})")
    return written, notes
