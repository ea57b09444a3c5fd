"""Label files both ways: CSV (`id,label[,reviewer,note]`) and QuPath GeoJSON, for `labels import` / `export`.

CSV: a header naming `id` and `label` (and optionally `reviewer`, `note`); export adds the stored label, binary,
source, time and event. GeoJSON: features are matched to rows by `properties.name` (the row id, as
`views.geojson` writes tiles and cells), their class is `properties.classification.name` (or a plain string);
export writes the reviewed rows that sit on a slide as QuPath objects (the tile's square, from its id or its
`x`, `y`, `tile_size`), classified by the review, with `reviewer`, `note`, `stored_label` and `source` in its
`properties`. Rows without a slide position (cell-dataset rows) cannot be placed in
QuPath: they are counted and left out of a GeoJSON export (the CSV has them all).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import parse_tile_id
from cytoretrieve.store.labels import LabelInput
from cytoretrieve.views.geojson import SlideSquare, class_color, feature

CSV_EXPORT_COLUMNS = ("id", "label", "reviewer", "note", "stored_label", "binary", "source", "time", "event")


def _is_geojson(path: Path) -> bool:
    return path.suffix.lower() in (".geojson", ".json")


def read_label_file(path: str | Path) -> list[LabelInput]:
    """The labels of a CSV or QuPath GeoJSON file (by suffix: .geojson / .json, else CSV); a malformed file or a
    row without id or label is a `CytoError` naming it (nothing is read from a bad file)."""
    path = Path(path)
    if not path.is_file():
        raise CytoError(f"no labels file {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CytoError(f"labels file {path} is not UTF-8 text: {e}") from None
    return _read_geojson(text, path) if _is_geojson(path) else _read_csv(text, path)


def _read_csv(text: str, path: Path) -> list[LabelInput]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "id" not in fields or "label" not in fields:
        raise CytoError(f"labels file {path} needs a header with `id` and `label` columns (got {', '.join(fields) or 'none'})")
    out = []
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not row.get("id") or not row.get("label"):
            raise CytoError(f"labels file {path} line {n}: `id` and `label` must both be given")
        out.append(LabelInput(row["id"], row["label"], row.get("reviewer") or None, row.get("note") or None))
    return out


def _read_geojson(text: str, path: Path) -> list[LabelInput]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CytoError(f"labels file {path} is not JSON: {e}") from None
    features = data.get("features") if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    if not isinstance(features, list):
        raise CytoError(f"labels file {path} is not GeoJSON (no FeatureCollection or Feature list)")
    out = []
    for i, feat in enumerate(features):
        props = feat.get("properties") if isinstance(feat, dict) else None
        if not isinstance(props, dict) or not props.get("name"):
            raise CytoError(f"labels file {path} feature {i}: no `properties.name` (the row id)")
        c = props.get("classification")
        label = c.get("name") if isinstance(c, dict) else c
        if not label or not isinstance(label, str):
            raise CytoError(f"labels file {path} feature {i} ({props['name']}): no classification")
        out.append(LabelInput(str(props["name"]), label, props.get("reviewer") or None, props.get("note") or None))
    return out


def _square(row: dict[str, Any]) -> SlideSquare | None:
    """The reviewed row's square on its slide, or None for a row without a slide position."""
    parsed = parse_tile_id(row["id"])
    if parsed is not None:
        _, x, y, side = parsed
    elif row.get("slide") is not None and row.get("x") is not None and row.get("y") is not None:
        x, y, side = row["x"], row["y"], row.get("tile_size") or 1
    else:
        return None
    return SlideSquare(row["id"], x, y, side, row["label"], class_color(row["label"]))


def write_label_file(reviews: Sequence[dict[str, Any]], path: str | Path, object_type: str = "detection") -> tuple[Path, int]:
    """Write reviews (rows of `queries.labels.current_reviews`, with the row's `slide`, `x`, `y`, `tile_size` for
    GeoJSON) as CSV or QuPath GeoJSON (by suffix); (path, rows left out because they sit on no slide)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _is_geojson(path):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_EXPORT_COLUMNS)
        for r in reviews:
            w.writerow(["" if r.get(c) is None else r[c] for c in CSV_EXPORT_COLUMNS])
        path.write_text(buf.getvalue(), encoding="utf-8")
        return path, 0
    features, left_out = [], 0
    for r in reviews:
        square = _square(r)
        if square is None:
            left_out += 1
            continue
        f = feature(square, object_type)
        f["properties"].update({k: r[k] for k in ("reviewer", "note", "stored_label", "source") if r.get(k)})
        features.append(f)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1) + "\n", encoding="utf-8")
    return path, left_out
