"""The viewer's label endpoints with the framework's test client: record (bulk), list, history, undo, suggest; the
token rule, read-only servers, JSON-only writes; and two reviewers labelling at once losing nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from cytoretrieve.store.labels import read_events  # noqa: E402
from cytoretrieve.store.tables import Store  # noqa: E402
from cytoretrieve.views.web.app import create_app  # noqa: E402
from helpers.label_tables import TABLE, toy_store  # noqa: E402

URL = f"/api/tables/{TABLE}/labels"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return toy_store(tmp_path)


def test_label_list_history_undo_suggest(store: Store) -> None:
    client = TestClient(create_app(store.uri))
    r = client.post(URL, json={"reviewer": "ana", "labels": [{"id": "A/0", "label": "B"}, {"id": "A/1", "label": "C",
                                                                                          "note": "odd"}]})
    assert r.status_code == 200, r.text
    assert [e["label"] for e in r.json()["events"]] == ["B", "C"]
    listed = client.get(URL).json()
    assert {x["id"]: x["disagrees"] for x in listed["reviews"]} == {"A/0": True, "A/1": True}
    assert listed["counts"]["reviewed_rows"] == 2 and listed["read_only"] is False
    assert client.post(f"{URL}/undo", json={"id": "A/0", "reviewer": "ana"}).json()["event"]["label"] is None
    hist = client.get(f"{URL}/history", params={"id": "A/0"}).json()["events"]
    assert [e["action"] for e in hist] == ["label", "undo"]
    suggested = client.get(f"{URL}/suggest", params={"n": 5}).json()
    assert len(suggested["rows"]) == 5 and "A/1" not in {s["id"] for s in suggested["rows"]}
    paths = client.get("/openapi.json").json()["paths"]
    assert {URL.replace(TABLE, "{name}") + p for p in ("", "/history", "/undo", "/suggest")} <= set(paths)


def test_refusals(store: Store) -> None:
    client = TestClient(create_app(store.uri))
    bad = client.post(URL, json={"reviewer": "ana", "labels": [{"id": "A/0", "label": "B"}, {"id": "A/1", "label": "ZZ"}]})
    assert bad.status_code == 400 and "not among the classes" in bad.json()["detail"]
    assert client.post(URL, json={"labels": [{"id": "A/0", "label": "B"}]}).status_code == 422  # no reviewer
    assert client.post("/api/tables/nope/labels", json={"reviewer": "a", "labels": [{"id": "x", "label": "B"}]}).status_code == 404
    plain = client.post(URL, content='{"reviewer": "a", "labels": [{"id": "A/0", "label": "B"}]}',
                        headers={"content-type": "text/plain"})  # what a cross-site form could send
    assert plain.status_code == 422
    assert client.post(f"{URL}/undo", json={"id": "B/0", "reviewer": "a"}).status_code == 400
    assert read_events(store, TABLE).num_rows == 0

    locked = TestClient(create_app(store.uri, read_only=True))
    assert locked.post(URL, json={"reviewer": "a", "labels": [{"id": "A/0", "label": "B"}]}).status_code == 403
    assert locked.post(f"{URL}/undo", json={"id": "A/0", "reviewer": "a"}).status_code == 403
    assert locked.get(URL).status_code == 200 and locked.get(URL).json()["read_only"] is True

    guarded = TestClient(create_app(store.uri, token="s3cret"))
    body = {"reviewer": "a", "labels": [{"id": "A/0", "label": "B"}]}
    assert guarded.post(URL, json=body).status_code == 401
    assert guarded.post(URL, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert read_events(store, TABLE).num_rows == 1


def test_two_reviewers_at_once_lose_nothing(store: Store) -> None:
    client = TestClient(create_app(store.uri))
    n = 60

    def reviewer(name: str) -> list[int]:
        codes = []
        for i in range(n):
            row = f"{'B' if name == 'ana' else 'C'}/{i % 10}"
            r = client.post(URL, json={"reviewer": name, "labels": [{"id": row, "label": "A", "note": str(i)}]})
            codes.append(r.status_code)
        return codes

    with ThreadPoolExecutor(2) as pool:
        codes = [c for cs in pool.map(reviewer, ["ana", "bob"]) for c in cs]
    assert codes == [200] * (2 * n)
    log = read_events(store, TABLE).to_pylist()
    assert len(log) == 2 * n and len({e["event"] for e in log}) == 2 * n
    for name in ("ana", "bob"):
        assert [int(e["note"]) for e in log if e["reviewer"] == name] == list(range(n))
