"""A table's 2-D map: PCA or t-SNE, cached per table version in the index folder, recomputed when the table changes,
sampled over the cap; and the viewer's map route, bulk undo and class list beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.store import maps
from cytoretrieve.store.labels import read_events
from cytoretrieve.store.tables import Store
from helpers.label_tables import TABLE, toy_store, toy_table


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return toy_store(tmp_path)


def test_pca_map_is_cached_per_version_and_separates_the_classes(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    table = store.open(TABLE)
    first = maps.table_map(table, "pca")
    assert len(first.ids) == first.total == 30 and not first.sampled
    assert first.x.min() == first.y.min() == 0 and first.x.max() == first.y.max() == 1  # each axis fills the canvas
    assert dict(zip(first.ids, first.labels))["B/3"] == "B"
    points = np.stack([first.x, first.y], 1)
    centres = {c: points[[i for i, r in enumerate(first.ids) if r.startswith(c)]].mean(0) for c in "ABC"}
    spread = max(np.linalg.norm(points[i] - centres[r[0]]) for i, r in enumerate(first.ids))
    assert min(np.linalg.norm(centres[a] - centres[b]) for a, b in ("AB", "AC", "BC")) > 2 * spread
    assert (store.index_dir() / f"{TABLE}.map.pca.arrow").exists()

    calls = []
    monkeypatch.setitem(maps.MAP_METHODS, "pca", maps.MapMethod("pca", lambda v: calls.append(len(v)) or v[:, :2], 100))
    again = maps.table_map(store.open(TABLE), "pca")  # same version: the cache, not a new fit
    assert calls == [] and again.ids == first.ids and np.allclose(again.x, first.x)

    toy_table(store, per_class=11, seed=1)  # the same ids again plus one new per class: a new version
    table = store.open(TABLE)
    changed = maps.table_map(table, "pca")
    assert calls == [table.count()] and changed.version == table.version and len(changed.ids) == table.count()


def test_sample_over_the_cap_tsne_and_unknown_method(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(maps.MAP_METHODS, "pca", maps.MapMethod("pca", maps._pca, 12))
    small = maps.table_map(store.open(TABLE), "pca")
    assert small.sampled and 0 < len(small.ids) <= 12 and len(set(small.ids)) == len(small.ids)
    assert "sample" in maps.map_info(small)["note"]
    tsne = maps.table_map(store.open(TABLE), "tsne")
    assert len(tsne.ids) == 30 and np.isfinite(tsne.x).all()
    with pytest.raises(CytoError, match="unknown map method 'umap': use one of pca, tsne"):
        maps.table_map(store.open(TABLE), "umap")


def test_map_route_bulk_undo_and_classes(store: Store) -> None:
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from cytoretrieve.views.web.app import create_app

    client = TestClient(create_app(store.uri))
    url = f"/api/tables/{TABLE}"
    listed = client.get(f"{url}/labels").json()
    assert listed["classes"] == ["A", "B", "C"] and listed["unsure"] == "unsure"
    r = client.post(f"{url}/labels", json={"reviewer": "ana", "labels": [{"id": "A/0", "label": "B"},
                                                                           {"id": "A/1", "label": "unsure"}]})
    assert r.status_code == 200, r.text
    answer = client.get(f"{url}/map", params={"method": "pca"}).json()
    assert answer["points"] == 30 and len(answer["x"]) == len(answer["ids"]) == len(answer["review"]) == 30
    review = dict(zip(answer["ids"], answer["review"]))
    assert review["A/0"] == "B" and review["A/1"] == "unsure" and review["A/2"] is None
    assert dict(zip(answer["ids"], answer["label"]))["A/0"] == "A"
    assert client.get(f"{url}/map", params={"method": "nope"}).status_code == 400
    assert client.get("/api/tables/nope/map").status_code == 404

    undone = client.post(f"{url}/labels/undo", json={"ids": ["A/0", "A/1"], "reviewer": "ana"})
    assert undone.status_code == 200 and [e["label"] for e in undone.json()["events"]] == [None, None]
    log = read_events(store, TABLE)
    assert log.num_rows == 4 and log.column("action").to_pylist() == ["label", "label", "undo", "undo"]
    assert client.post(f"{url}/labels/undo", json={"ids": ["A/0", "A/5"], "reviewer": "ana"}).status_code == 400
    assert client.post(f"{url}/labels/undo", json={"reviewer": "ana"}).status_code == 422
    assert read_events(store, TABLE).num_rows == 4  # a refused undo writes nothing
    assert f"{url.replace(TABLE, '{name}')}/map" in client.get("/openapi.json").json()["paths"]


def test_undo_of_named_events_walks_back_a_page_s_actions(store: Store) -> None:
    """Two actions on one row, undone latest first by their events: back to the first review, then to none (a
    plain undo of the row would redo the second action instead)."""
    from cytoretrieve.store.labels import LabelInput, latest_events, record_labels, undo_rows

    first = record_labels(store, TABLE, [LabelInput("A/0", "B"), LabelInput("A/1", "B")], reviewer="ana")
    second = record_labels(store, TABLE, [LabelInput("A/0", "C")], reviewer="ana")
    undo_rows(store, TABLE, ["A/0"], "ana", [second[0].event])
    assert latest_events(store, TABLE)["A/0"].label == "B"
    undo_rows(store, TABLE, ["A/0", "A/1"], "ana", [e.event for e in first])
    now = latest_events(store, TABLE)
    assert now["A/0"].label is None and now["A/1"].label is None and now["A/0"].action == "undo"
    with pytest.raises(CytoError, match="no event"):
        undo_rows(store, TABLE, ["A/1"], "ana", [second[0].event])  # an event of another row
    assert read_events(store, TABLE).num_rows == 6
