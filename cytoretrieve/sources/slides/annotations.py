"""QuPath GeoJSON annotations -> labelled rows: a cell crop around each annotation and a tile centred on it.

QuPath's "Export objects as GeoJSON" writes a FeatureCollection (or a bare list of Features) in level-0 pixel
coordinates; each Feature has a geometry and `properties.classification` (`{"name": "HSIL", ...}`; a plain
string is accepted too). Supported geometries: Point, MultiPoint (one annotation per point), Polygon and
MultiPolygon (centred on the area-weighted centroid). Features without a classification, with another geometry,
or centred outside the slide are reported and not imported; none of that stops the import.

Two tile tables (kind `tiles`, source `annotations`) come out of one import (`cytoretrieve.jobs.tile.import_annotations`
writes them), both at `target_mpp` (20x):
- `<table>_cells`: a square crop around each annotation: `cell_size` px for a point, the polygon's bounding
  box plus `margin` on each side for a polygon (at least `cell_size`);
- `<table>_tiles`: a `tile_size` px tile (320) centred on each annotation.
The annotation's class is the row's `label` and its `binary` comes from a label map (default: the Bethesda
categories, HSIL / LSIL / ASC-US / ASC-H / SCC positive, "Negative for intraepithelial lesion" negative; classes
the map lacks get a null binary): `score --positives` uses the binary = 1 rows. `annotation` holds the feature id. Rows read like grid tiles
(`SlideReader.read_row`). Regions that cross the slide's edge are read padded with the background colour.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import slide_id, tile_id
from cytoretrieve.sources.cells.labels import BETHESDA, LabelMap
from cytoretrieve.sources.cohort.labels import expand_slides
from cytoretrieve.sources.slides.reader import Slide

CELL_SIZE = 128  # px at target_mpp around a point annotation (64 um at 0.5 um/px)
MARGIN = 0.1  # of a polygon's bounding box, on each side


@dataclass(frozen=True)
class Annotation:
    id: str
    label: str | None
    geometry: str  # "point" or "polygon"
    cx: float  # centre, level-0 px
    cy: float
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in level-0 px


def _xy(p: Any) -> tuple[float, float]:
    x, y = float(p[0]), float(p[1])
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError("coordinate is not finite")
    return x, y


def _ring(coords: Any) -> tuple[float, float, float, tuple[float, float, float, float]]:
    """Signed area, centroid and bounding box of a polygon's exterior ring."""
    pts = [_xy(p) for p in coords]
    if len(pts) < 3:
        raise ValueError("a polygon ring needs 3 points")
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    bbox = (min(xs), min(ys), max(xs), max(ys))
    if abs(a) < 1e-9:  # degenerate: the mean of its points
        return 0.0, sum(xs) / len(xs), sum(ys) / len(ys), bbox
    return a / 2, cx / (3 * a), cy / (3 * a), bbox


def _classification(props: dict[str, Any]) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        name = c.get("name") or (": ".join(c["names"]) if isinstance(c.get("names"), list) else None)
        return str(name) if name else None
    return str(c) if isinstance(c, str) and c else None


def geojson_features(path: str | Path) -> list[Any]:
    """The features of a GeoJSON file: a FeatureCollection, one Feature or a bare list (QuPath writes all three);
    a missing file or one that is not GeoJSON is a `CytoError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CytoError(f"no annotations file {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CytoError(f"annotations file {path} is not JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("features"), list):
        return list(data["features"])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, list):
        return data
    raise CytoError(f"annotations file {path} is not GeoJSON (no FeatureCollection or Feature list)")


def read_geojson(path: str | Path) -> tuple[list[Annotation], list[str]]:
    """Annotations of a QuPath GeoJSON export and what was left out (one line each).

    A file that is not GeoJSON is a `CytoError`; a feature that cannot be used is only reported.
    """
    path = Path(path)
    features = geojson_features(path)
    out: list[Annotation] = []
    problems: list[str] = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            problems.append(f"feature {i}: not a GeoJSON Feature")
            continue
        props = feat.get("properties") or {}
        fid = str(feat.get("id") or props.get("name") or f"{path.stem}#{i}")
        geom = feat.get("geometry") or {}
        kind = geom.get("type")
        label = _classification(props if isinstance(props, dict) else {})
        if label is None:
            problems.append(f"{fid}: no classification")
            continue
        try:
            coords = geom["coordinates"]
            if kind == "Point":
                x, y = _xy(coords)
                out.append(Annotation(fid, label, "point", x, y, (x, y, x, y)))
            elif kind == "MultiPoint":
                for k, p in enumerate(coords):
                    x, y = _xy(p)
                    out.append(Annotation(f"{fid}#{k}", label, "point", x, y, (x, y, x, y)))
            elif kind in ("Polygon", "MultiPolygon"):
                rings = [coords[0]] if kind == "Polygon" else [poly[0] for poly in coords]
                parts = [_ring(r) for r in rings]
                area = sum(abs(p[0]) for p in parts)
                if area > 0:
                    cx = sum(abs(p[0]) * p[1] for p in parts) / area
                    cy = sum(abs(p[0]) * p[2] for p in parts) / area
                else:
                    cx, cy = sum(p[1] for p in parts) / len(parts), sum(p[2] for p in parts) / len(parts)
                bbox = (min(p[3][0] for p in parts), min(p[3][1] for p in parts),
                        max(p[3][2] for p in parts), max(p[3][3] for p in parts))
                out.append(Annotation(fid, label, "polygon", cx, cy, bbox))
            else:
                problems.append(f"{fid}: {kind or 'no'} geometry is not supported (points and polygons are)")
        except (KeyError, IndexError, TypeError, ValueError) as e:
            problems.append(f"{fid}: malformed {kind} geometry ({e})")
    return out, problems


@dataclass
class AnnotationResult:
    """One slide of an import. `status`: imported, done (both tables already hold it) or skipped."""

    slide: str
    path: str
    annotations: str
    status: str
    cells: int = 0
    tiles: int = 0
    outside: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    reason: str | None = None


@dataclass
class AnnotationReport:
    cells_table: str
    tiles_table: str
    results: list[AnnotationResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"cells_table": self.cells_table, "tiles_table": self.tiles_table, "seconds": round(self.seconds, 3),
                "slides": [asdict(r) for r in self.results]}


def annotation_rows(
    slide: Slide,
    annotations: Sequence[Annotation],
    *,
    target_mpp: float = 0.5,
    tile_size: int = 320,
    cell_size: int = CELL_SIZE,
    margin: float = MARGIN,
    tables: tuple[str, str] = ("annotations_cells", "annotations_tiles"),
    labels: LabelMap = BETHESDA,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], list[str]]:
    """(cell rows, tile rows, outside, duplicates) for the annotations of one open slide; each row's `binary`
    is its class's in `labels` (null for a class the map does not name)."""
    info = slide.info
    choice = slide.choose_level(target_mpp, tile_size)
    per_px = choice.extent / tile_size  # level-0 px per output px
    w, h = info.dimensions
    cells: list[dict[str, Any]] = []
    tiles: list[dict[str, Any]] = []
    outside: list[str] = []
    duplicates: list[str] = []
    seen: set[str] = set()

    def row(table: str, a: Annotation, size: int, read_size: int, extent: int) -> dict[str, Any]:
        x, y = round(a.cx - extent / 2), round(a.cy - extent / 2)
        return {
            "id": tile_id(info.id, x, y, extent), "dataset": table, "path": info.path, "label": a.label,
            "binary": labels.binary_of(a.label), "group": info.id, "slide": info.id, "x": x, "y": y, "level": choice.level,
            "tile_size": size, "mpp": choice.tile_mpp, "read_size": read_size, "extent": extent, "coverage": None,
            "source": "annotation", "annotation": a.id,
        }

    for a in annotations:
        if not (0 <= a.cx < w and 0 <= a.cy < h):
            outside.append(f"{a.id} at ({a.cx:.0f}, {a.cy:.0f}) is outside the slide ({w} x {h} px)")
            continue
        side_l0 = max(a.bbox[2] - a.bbox[0], a.bbox[3] - a.bbox[1]) * (1 + 2 * margin)
        size = max(cell_size, math.ceil(side_l0 / per_px)) if a.geometry == "polygon" else cell_size
        read, extent = choice.scaled(size)
        cell = row(tables[0], a, size, read, extent)
        tile = row(tables[1], a, tile_size, choice.read_size, choice.extent)
        if cell["id"] in seen or tile["id"] in seen:
            duplicates.append(f"{a.id}: same place and size as an earlier annotation")
            continue
        seen.update((cell["id"], tile["id"]))
        cells.append(cell)
        tiles.append(tile)
    return cells, tiles, outside, duplicates


def pair_annotations(geojsons: Sequence[str | Path], slides: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(slide, annotations file) pairs: one of each pairs directly; otherwise `<slide id>.geojson` (or
    `<slide file>.geojson`, `.json`) goes with the slide of that id. Unmatched files are a user error."""
    files = [Path(g) for g in geojsons]
    missing = [str(g) for g in files if not g.is_file()]
    if missing:
        raise CytoError(f"no annotations file {', '.join(missing[:5])}")
    paths = expand_slides(slides)
    if len(files) == 1 and len(paths) == 1:
        return [(paths[0], files[0])]
    by_id = {slide_id(p): p for p in paths}
    pairs: dict[str, tuple[Path, Path]] = {}
    for g in files:
        name = g.name
        for suffix in (".geojson", ".json"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        sid = slide_id(name)
        if sid not in by_id:
            raise CytoError(f"no slide '{sid}' for annotations {g} (slides given: {', '.join(sorted(by_id)) or 'none'})")
        if sid in pairs:
            raise CytoError(f"two annotation files for slide '{sid}': {pairs[sid][1]} and {g}")
        pairs[sid] = (by_id[sid], g)
    return list(pairs.values())


POINT_IMAGE_KEYS = ("image", "slide", "frame", "field", "imageName", "image_name")  # property naming a point's image
POINT_OBJECT_TYPES = ("annotation", "detection", "cell")  # QuPath objectType values whose points are read


def read_geojson_points(path: str | Path) -> tuple[dict[str | None, list[tuple[float, float]]], list[str]]:
    """Point annotations of a QuPath GeoJSON export (nuclei clicked with the points tool), grouped by image, and
    what was left out (one line each).

    Every Point and each point of a MultiPoint counts, whatever its class (QuPath's points tool makes one
    MultiPoint annotation per class); features of another geometry (a region drawn around the area of interest)
    or another `objectType` (a TMA core, a tile) are only reported. A feature's image is the first of its
    properties `POINT_IMAGE_KEYS` (a script can set it when exporting several images to one file), else None:
    the caller names it, usually after the file. Coordinates are level-0 px, as QuPath writes them.
    """
    path = Path(path)
    out: dict[str | None, list[tuple[float, float]]] = {}
    problems: list[str] = []
    for i, feat in enumerate(geojson_features(path)):
        if not isinstance(feat, dict):
            problems.append(f"feature {i}: not a GeoJSON Feature")
            continue
        props = feat.get("properties") if isinstance(feat.get("properties"), dict) else {}
        fid = str(feat.get("id") or props.get("name") or f"{path.stem}#{i}")
        kind = str(props.get("objectType") or "annotation").lower()
        geom = feat.get("geometry") if isinstance(feat.get("geometry"), dict) else {}
        if kind not in POINT_OBJECT_TYPES:
            problems.append(f"{fid}: a QuPath {kind}, not an annotation or detection")
            continue
        if geom.get("type") not in ("Point", "MultiPoint"):
            problems.append(f"{fid}: {geom.get('type') or 'no'} geometry is not a point")
            continue
        image = next((str(props[k]) for k in POINT_IMAGE_KEYS if isinstance(props.get(k), str) and props[k]), None)
        try:
            coords = geom["coordinates"]
            pts = [_xy(coords)] if geom["type"] == "Point" else [_xy(p) for p in coords]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            problems.append(f"{fid}: malformed {geom['type']} geometry ({e})")
            continue
        out.setdefault(image, []).extend(pts)
    return out, problems
