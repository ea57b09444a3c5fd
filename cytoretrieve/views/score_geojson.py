"""QuPath objects of a scoring run (`cytoretrieve score --out DIR`): `DIR/geojson/<slide>.geojson` per slide.

Each tile of a scored slide becomes a QuPath `tile` (or `detection`) object over its level-0 square, written by
`views.geojson`. `measurements` carry the out-of-fold tile score as the heat map colours it (`tile score`, see
`views.heatmap.display_scores`), the slide score and the fold; `classification` is the tile's predicted class,
`Positive` or `Negative` (QuPath's own class names, so its colours apply): an instance score above 0 for the
methods that score instances (`mean`, `max`, `topk`: a logit; `retrieval`: nearer positives than negatives), and,
for attention (`abmil`, `gated`), above-uniform attention in a slide predicted positive (its score at or above its
fold's threshold). In QuPath, Measure > Show measurement maps on `tile score` shows the heat map on the slide.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytoretrieve.store.filters import HAS_LOCATION
from cytoretrieve.views.geojson import NEGATIVE_COLOR, POSITIVE_COLOR, SlideSquare, write_geojson
from cytoretrieve.views.heatmap import display_scores, safe_names, slide_tiles, tile_extents

if TYPE_CHECKING:
    from cytoretrieve.queries.mil.bags import Bags
    from cytoretrieve.queries.mil.evaluate import CVResult
    from cytoretrieve.store.tables import VectorTable

ATTENTION = ("abmil", "gated")


def tile_classes(method: str, shown: np.ndarray, slide_positive: bool) -> list[str]:
    """`Positive` / `Negative` per tile from its displayed score (the rule in the module docstring)."""
    positive = (shown > 1.0) & slide_positive if method in ATTENTION else shown > 0.0
    return ["Positive" if p else "Negative" for p in positive]


def write_score_geojson(table: VectorTable, result: CVResult, bags: Bags, folder: Path, *,
                        group_column: str = "slide", object_type: str = "tile") -> tuple[list[Path], list[str]]:
    """Write folder/geojson/<slide>.geojson for each scored slide with tile coordinates; (files, notes)."""
    if not result.slides or table.count(HAS_LOCATION) == 0:
        return [], [f"no GeoJSON: table '{table.name}' has no tile coordinates (x, y)"] if result.slides else []
    thresholds = {f.fold: f.threshold for f in result.folds}
    pos = {name: i for i, name in enumerate(bags.names)}
    stems = safe_names(result.slides)
    written: list[Path] = []
    skipped: list[str] = []
    for slide, fold, score in zip(result.slides, result.fold_of, result.scores):
        shown = display_scores(result.method, result.tile_scores.get(slide, []))
        ids = bags.ids[pos[slide]] if bags.ids is not None and slide in pos else None
        rows = slide_tiles(table, group_column, slide)
        if ids is None or len(ids) != len(shown) or not rows:
            skipped.append(slide)
            continue
        sides = tile_extents(rows, None)
        classes = tile_classes(result.method, shown, score >= thresholds.get(fold, np.inf))
        squares = [
            SlideSquare(tid, rows[tid]["x"], rows[tid]["y"], sides[tid], cls,
                        POSITIVE_COLOR if cls == "Positive" else NEGATIVE_COLOR,
                        {"tile score": float(v), "slide score": float(score), "fold": float(fold)})
            for tid, v, cls in zip(ids, shown, classes) if tid in rows and np.isfinite(v)
        ]
        written.append(write_geojson(squares, folder / "geojson" / f"{stems[slide]}.geojson", object_type))
    notes = [f"GeoJSON: {len(skipped)} slide(s) without tile coordinates or scores skipped (e.g. {skipped[0]})"] if skipped else []
    return written, notes
