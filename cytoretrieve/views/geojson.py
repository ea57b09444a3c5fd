"""QuPath GeoJSON: squares on a slide (search hits, scored tiles) as objects QuPath opens with File > Import objects.

The schema is the one QuPath (0.4+) writes with "Export objects as GeoJSON": a FeatureCollection of Features,
each with a UUID `id`, a closed Polygon `geometry` in level-0 pixel coordinates and `properties`:
`objectType` (`tile` or `detection`, also `annotation`), `classification` `{name, color: [r, g, b]}` and
`measurements` `{name: number}`. The row id goes to `properties.name`, and the feature id is a UUID derived from it,
so a re-export gives the same ids. `sources/slides/annotations.read_geojson` reads these files back.

Anything with a level-0 square can be written: `SlideSquare` rows (`x`, `y` top-left, `side`) from any query.
Detected cells (`cytoretrieve cells`) are written as QuPath `cell` objects (`cell_feature`): the cell's outline
(a circle of the measured cell area, or of the nucleus where the cell was not separated) as `geometry`, the nucleus
as `nucleusGeometry`, and the measurements in um / um^2.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OBJECT_TYPES = ("tile", "detection", "annotation")  # for squares; detected cells: `cell_feature`
_NAMESPACE = uuid.UUID("6f1c1d2e-7a43-4c1e-9a8e-1d6f0c2b5a90")  # feature ids: uuid5 of the row id in this space
POSITIVE_COLOR = (214, 39, 40)
NEGATIVE_COLOR = (44, 160, 44)


@dataclass(frozen=True)
class SlideSquare:
    """One square in level-0 px: top-left (`x`, `y`), `side`; its class name and numbers to carry along."""

    id: str
    x: float
    y: float
    side: float
    name: str | None = None
    color: tuple[int, int, int] | None = None
    measurements: Mapping[str, float] = field(default_factory=dict)


def class_color(name: str) -> tuple[int, int, int]:
    """A stable, well-saturated colour for a class name (the same name always gets the same colour)."""
    hue = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=2).digest(), "little") / 65536
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def feature_id(row_id: str) -> str:
    """The UUID QuPath needs as a feature id, derived from the row id (stable across exports)."""
    return str(uuid.uuid5(_NAMESPACE, row_id))


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def feature(square: SlideSquare, object_type: str = "tile") -> dict[str, Any]:
    """One QuPath Feature: the square as a closed Polygon ring, clockwise from its top-left corner."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object type {object_type!r} is not one of {', '.join(OBJECT_TYPES)}")
    x0, y0, s = float(square.x), float(square.y), float(square.side)
    ring = [[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s], [x0, y0]]
    props: dict[str, Any] = {"objectType": object_type, "name": square.id}
    if square.name is not None:
        props["classification"] = {"name": square.name, "color": list(square.color or class_color(square.name))}
    measurements = {k: n for k, v in square.measurements.items() if (n := _number(v)) is not None}
    if measurements:
        props["measurements"] = measurements
    return {"type": "Feature", "id": feature_id(square.id), "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": props}


def feature_collection(squares: Iterable[SlideSquare], object_type: str = "tile") -> dict[str, Any]:
    """A FeatureCollection of the squares, in the order given."""
    return {"type": "FeatureCollection", "features": [feature(s, object_type) for s in squares]}


def geojson_text(squares: Iterable[SlideSquare], object_type: str = "tile") -> str:
    return json.dumps(feature_collection(squares, object_type), indent=1)


def write_geojson(squares: Iterable[SlideSquare], path: str | Path, object_type: str = "tile") -> Path:
    """Write the squares as a QuPath GeoJSON file (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(geojson_text(squares, object_type) + "\n", encoding="utf-8")
    return path


CELL_MEASUREMENTS = ("nucleus_area_um2", "cell_area_um2", "nc_ratio", "darkness", "confidence")


def _circle(cx: float, cy: float, r: float, n: int = 24) -> list[list[float]]:
    """A closed ring of `n` points around (cx, cy), clockwise in image coordinates from the top."""
    pts = [[round(cx + r * math.sin(2 * math.pi * k / n), 2), round(cy - r * math.cos(2 * math.pi * k / n), 2)]
           for k in range(n)]
    return [*pts, pts[0]]


def cell_feature(row: Mapping[str, Any], slide_mpp: float) -> dict[str, Any]:
    """One detected cell (a cell-table row) as a QuPath `cell` object; `slide_mpp` is level-0 um/px."""
    cx, cy = float(row["nucleus_x"]), float(row["nucleus_y"])
    nucleus_um2 = _number(row.get("nucleus_area_um2")) or 30.0
    cell_um2 = _number(row.get("cell_area_um2"))
    r_nucleus = math.sqrt(nucleus_um2 / math.pi) / slide_mpp
    r_cell = math.sqrt(cell_um2 / math.pi) / slide_mpp if cell_um2 else r_nucleus
    props: dict[str, Any] = {"objectType": "cell", "name": row["id"],
                             "nucleusGeometry": {"type": "Polygon", "coordinates": [_circle(cx, cy, r_nucleus)]}}
    if row.get("label"):
        props["classification"] = {"name": row["label"], "color": list(class_color(row["label"]))}
    measurements = {k: n for k in CELL_MEASUREMENTS if (n := _number(row.get(k))) is not None}
    if measurements:
        props["measurements"] = measurements
    return {"type": "Feature", "id": feature_id(row["id"]),
            "geometry": {"type": "Polygon", "coordinates": [_circle(cx, cy, r_cell)]}, "properties": props}


def write_cells_geojson(rows: Iterable[Mapping[str, Any]], slide_mpp: float, path: str | Path) -> Path:
    """Write detected cells as a QuPath GeoJSON file of `cell` objects (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    collection = {"type": "FeatureCollection", "features": [cell_feature(r, slide_mpp) for r in rows]}
    path.write_text(json.dumps(collection, indent=1) + "\n", encoding="utf-8")
    return path
