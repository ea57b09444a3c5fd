"""Search as pictures and as a score: the HTML page, the contact sheet, QuPath GeoJSON (read back through the
project's own reader), `search --json PATH`, and `search --evaluate` checked against brute force."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.queries.search import Hit, SearchResult, search
from cytoretrieve.queries.search_eval import evaluate_search
from cytoretrieve.sources.slides.annotations import Annotation, read_geojson
from cytoretrieve.store.filters import Filters
from cytoretrieve.store.tables import Store
from cytoretrieve.views import contact_sheet
from cytoretrieve.views.geojson import SlideSquare, class_color, feature_id, write_geojson
from cytoretrieve.views.hits import BINARY_COLORS, hit_squares, hits_csv
from cytoretrieve.views.search_page import render_search_page
from helpers.herlev_subset import TABLE, TILE_TABLE, add_tiles, herlev_store

HERLEV_CODES = {"NS", "NI", "NC", "LD", "MD", "SD", "CIS"}
QUERY = "carcinoma_in_situ/149143370-149143378-001.jpg"


@pytest.fixture(scope="module")
def store(tmp_path_factory, herlev_root) -> Store:
    s = herlev_store(herlev_root, tmp_path_factory.mktemp("views"))
    add_tiles(s)
    return s


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_geojson_reads_back_through_read_geojson_as_the_same_squares(tmp_path: Path) -> None:
    squares = [SlideSquare("s1@100,200,320", 100, 200, 320, "HSIL", None, {"similarity": 0.93, "rank": 1}),
               SlideSquare("s1@420,200,320", 420.5, 200, 64, "Negative", (1, 2, 3), {"score": float("nan")})]
    path = write_geojson(squares, tmp_path / "out" / "hits.geojson", object_type="detection")
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    first, second = data["features"]
    assert first["type"] == "Feature" and first["id"] == feature_id("s1@100,200,320")
    assert first["properties"]["objectType"] == "detection"
    assert first["properties"]["classification"] == {"name": "HSIL", "color": list(class_color("HSIL"))}
    assert first["properties"]["measurements"] == {"similarity": 0.93, "rank": 1.0}
    assert "measurements" not in second["properties"]  # NaN is dropped, not written as invalid JSON
    assert second["properties"]["classification"]["color"] == [1, 2, 3]
    ring = first["geometry"]["coordinates"][0]
    assert first["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
    annotations, problems = read_geojson(path)
    assert problems == []
    assert annotations == [
        Annotation(feature_id("s1@100,200,320"), "HSIL", "polygon", 260.0, 360.0, (100.0, 200.0, 420.0, 520.0)),
        Annotation(feature_id("s1@420,200,320"), "Negative", "polygon", 452.5, 232.0, (420.5, 200.0, 484.5, 264.0)),
    ]
    with pytest.raises(ValueError, match="object type"):
        write_geojson(squares, tmp_path / "x.geojson", object_type="cell")


def test_html_page_is_self_contained_and_escapes_what_it_shows() -> None:
    hits = [Hit("a/<1>.jpg", 0.9, "<script>x</script>", 1, None, None, dataset="herlev"),
            Hit("s@10,20,320", 0.8, None, None, None, None, slide="s", x=10, y=20)]
    result = SearchResult("t", "q.png", hits, "<script>x</script>")
    page = render_search_page(result, {"a/<1>.jpg": _jpeg((200, 0, 0))}, _jpeg((0, 0, 200)))
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert len(re.findall(r'src="data:image/jpeg;base64,', page)) == 2  # query + the hit that has a picture
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a network
    assert "positive" in page and "unknown" in page and "s @ 10, 20" in page and "(no picture)" in page
    uri = re.search(r'src="data:image/jpeg;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(uri)[:2] == b"\xff\xd8"


def test_contact_sheet_puts_the_query_first_and_colours_hits_by_binary_class() -> None:
    hits = [Hit(f"h{i}", 0.9 - i / 10, "CIS" if i % 2 else "NS", i % 2, None, None) for i in range(7)]
    result = SearchResult("t", "query.png", hits, "NS")
    sheet = contact_sheet.render_contact_sheet(result, {h.id: _jpeg((90, 60, 140)) for h in hits}, _jpeg((0, 0, 0)))
    cell, pad, cols = contact_sheet.CELL, contact_sheet.PAD, contact_sheet.COLUMNS
    assert sheet.width == pad + cols * (cell + pad)
    assert sheet.height == contact_sheet.HEADER + 2 * (cell + contact_sheet.CAPTION_LINES * contact_sheet.LINE + pad) + pad
    top = contact_sheet.HEADER - 1  # the frame's top edge, just above each picture

    def frame(i: int) -> tuple[int, int, int]:
        x = pad + (i % cols) * (cell + pad) + cell // 2
        y = top + (i // cols) * (cell + contact_sheet.CAPTION_LINES * contact_sheet.LINE + pad)
        return sheet.getpixel((x, y))

    assert frame(0) == contact_sheet.QUERY_FRAME
    assert frame(1) == BINARY_COLORS["negative"] and frame(2) == BINARY_COLORS["positive"]


def test_cli_writes_html_png_and_json_to_a_path(store: Store, tmp_path: Path, capsys) -> None:
    out = tmp_path / "v"
    rc = run(["search", "--id", QUERY, "--table", TABLE, "--store", store.uri, "-k", "6", "--html", str(out / "h.html"),
              "--png", str(out / "s.png"), "--json", str(out / "r.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "neighbours' labels:" in printed and "majority" in printed and "wrote" in printed
    data = json.loads((out / "r.json").read_text())
    assert len(data["hits"]) == 6 and sum(data["label_counts"].values()) == 6 and data["query_id"] == QUERY
    page = (out / "h.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 7 and all(h["id"] in page for h in data["hits"])
    with Image.open(out / "s.png") as im:
        assert im.format == "PNG" and im.width > 6 * contact_sheet.CELL
    assert run(["search", "--id", QUERY, "--table", TABLE, "--store", store.uri, "-k", "3", "--json", "-"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3  # stdout is the JSON alone


def test_cli_geojson_of_tile_hits_and_a_one_line_error_for_cells(store: Store, tmp_path: Path, capsys) -> None:
    table = store.open(TILE_TABLE)
    query = table.read(["id"]).column("id")[0].as_py()
    path = tmp_path / "hits.geojson"
    assert run(["search", "--id", query, "--table", TILE_TABLE, "--store", store.uri, "-k", "5",
                "--geojson", str(path)]) == 0
    capsys.readouterr()
    result = search(table, row_id=query, k=5)
    annotations, problems = read_geojson(path)
    assert problems == [] and len(annotations) == 5
    for a, h in zip(annotations, result.hits):
        assert (a.bbox[0], a.bbox[1], a.bbox[2] - a.bbox[0]) == (h.x, h.y, h.side) and h.side > 0
    features = json.loads(path.read_text())["features"]
    assert [f["properties"]["measurements"]["similarity"] for f in features] == pytest.approx([h.score for h in result.hits])
    assert [s.id for s in hit_squares(result)] == [h.id for h in result.hits]
    csv_lines = hits_csv(result).splitlines()
    assert csv_lines[0].startswith("rank,id,similarity") and len(csv_lines) == 6
    rc = run(["search", "--id", QUERY, "--table", TABLE, "--store", store.uri, "--geojson", str(tmp_path / "c.geojson")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--geojson" in err


def test_evaluate_matches_brute_force_leave_one_out(store: Store) -> None:
    table = store.open(TABLE)
    result = evaluate_search(table, [1, 3, 5])
    labels = result.evaluations[0]
    assert labels.kind == "label" and {c.name for c in labels.classes} == HERLEV_CODES
    assert sum(c.n for c in labels.classes) == labels.overall.n == 84
    assert result.exclusion == "the query row itself"  # Herlev cells carry no group
    vectors, meta = table.vectors(["label"])
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)
    names = np.array(meta.column("label").to_pylist())
    for k in (1, 3, 5):
        expected = np.mean([(names[order[i, :k]] == names[i]).any() for i in range(len(names))])
        assert labels.overall.top[k] == pytest.approx(expected, abs=1e-4)
    assert labels.overall.top[1] <= labels.overall.top[3] <= labels.overall.top[5]
    binary = result.evaluations[1]
    assert binary.kind == "binary" and [c.name for c in binary.classes] == ["positive", "negative"]
    assert [c.n for c in binary.classes] == [48, 36]


def _grouped_table(store: Store, groups: list[str | None]):  # noqa: ANN202 - a VectorTable
    """Four pairs of near-twins on a circle: A at 0 and 90 degrees, B at 10 and 100 degrees, so a row's twin (same
    pair) shares its label but its nearest other pair has the other label."""
    angles = np.repeat([0.0, 10.0, 90.0, 100.0], 2) + np.tile([0.0, 0.5], 4)
    x = np.stack([np.cos(np.radians(angles)), np.sin(np.radians(angles))], axis=1).astype(np.float32)
    name = f"grouped_{len(store.table_names())}"
    t = store.create_or_open(name, {"arch": "none", "fingerprint": "0" * 64, "dim": 2}, {"name": "toy"})
    labels = np.repeat(["A", "B", "A", "B"], 2)
    t.add(t.make_rows([{"id": f"r{i}", "label": str(labels[i]), "group": groups[i]} for i in range(8)], x))
    return t


def test_evaluate_leaves_out_the_querys_own_group(tmp_path: Path, capsys) -> None:
    store = Store(tmp_path / "s")
    grouped = evaluate_search(_grouped_table(store, [f"g{i // 2}" for i in range(8)]), [1])
    assert grouped.evaluations[0].overall.top[1] == 0.0  # the twin is of the same group: left out
    assert "group" in grouped.exclusion
    ungrouped = evaluate_search(_grouped_table(store, [None] * 8), [1])
    assert ungrouped.evaluations[0].overall.top[1] == 1.0  # the twin counts when nothing says it is the same slide
    assert run(["search", "--evaluate", "--table", "grouped_0", "--store", store.uri, "--k", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "mMV@2" in out and "left out of each query's hits: the query's own group" in out
    assert run(["search", "--evaluate", "--table", "grouped_0", "--store", store.uri, "--id", "r0"]) == 2
    assert "--evaluate" in capsys.readouterr().err


def test_filters_quote_values_and_check_binary() -> None:
    assert Filters(label="O'Brien", binary=1).where() == "`label` = 'O''Brien' AND `binary` = 1"
    assert Filters().where() is None
    with pytest.raises(CytoError, match="`binary`"):
        Filters(binary=2).where()


def test_evaluate_asks_again_when_the_own_group_fills_the_first_hits(tmp_path: Path) -> None:
    """Groups of 20 near-copies: the first 2k + 1 hits of every query are its own group's, so each must ask again;
    the result must equal brute force with the group left out."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16)).astype(np.float32)
    x = np.repeat(centres, 20, axis=0) + 0.01 * rng.normal(size=(120, 16)).astype(np.float32)
    groups = np.repeat(np.arange(6), 20)
    labels = rng.choice(["A", "B"], size=120)
    store = Store(tmp_path / "s")
    t = store.create_or_open("big_groups", {"arch": "none", "fingerprint": "1" * 64, "dim": 16}, {"name": "toy"})
    t.add(t.make_rows([{"id": f"r{i}", "label": str(labels[i]), "group": f"g{groups[i]}"} for i in range(120)], x))
    got = evaluate_search(t, [1, 3]).evaluations[0].overall
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    sims[groups[:, None] == groups[None, :]] = -np.inf
    order = np.argsort(-sims, axis=1)
    for k in (1, 3):
        assert got.top[k] == pytest.approx(np.mean([(labels[order[i, :k]] == labels[i]).any() for i in range(120)]), abs=1e-4)
