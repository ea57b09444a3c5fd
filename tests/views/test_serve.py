"""The viewer's HTTP API with the framework's test client: every endpoint, every error a request can cause, the
token rule, a table that grows or is dropped while serving, and 8 concurrent clients over real HTTP."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from cytoretrieve.cli import run  # noqa: E402
from cytoretrieve.errors import CytoError  # noqa: E402
from cytoretrieve.sources.slides.annotations import read_geojson  # noqa: E402
from cytoretrieve.store.tables import Store  # noqa: E402
from cytoretrieve.views.web.app import create_app  # noqa: E402
from cytoretrieve.views.web.security import resolve_token  # noqa: E402
from helpers.herlev_subset import TABLE, TILE_TABLE, add_tiles, herlev_store  # noqa: E402

QUERY = "carcinoma_in_situ/149143370-149143378-001.jpg"
HERLEV_CODES = {"NS", "NI", "NC", "LD", "MD", "SD", "CIS"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, herlev_root) -> Store:
    s = herlev_store(herlev_root, tmp_path_factory.mktemp("serve"))
    add_tiles(s)
    return s


@pytest.fixture(scope="module")
def client(store: Store) -> TestClient:
    return TestClient(create_app(store.uri))


@pytest.fixture(scope="module")
def cell_image(herlev_root: Path) -> Path:
    folder = herlev_root / "carcinoma_in_situ"
    return sorted(folder.iterdir())[0]


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _one_line_error(response, status: int) -> str:  # noqa: ANN001 - an httpx response
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    return detail


def test_page_static_files_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="table"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/tables", "/api/tables/{name}/facets", "/api/tables/{name}/rows", "/api/tables/{name}/search",
                 "/api/tables/{name}/thumbnail", "/api/overview"):
        assert path in paths
    assert set(paths["/api/tables/{name}/search"]) == {"get", "post"}


def test_tables_facets_and_rows(client: TestClient) -> None:
    tables = {t["name"]: t for t in client.get("/api/tables").json()}
    assert set(tables) == {TABLE, TILE_TABLE}  # the tile bag and the overviews table hold no vectors
    assert tables[TABLE] == {"name": TABLE, "rows": 84, "arch": "resnet18", "dim": 512, "dataset": "herlev"}
    facets = client.get(f"/api/tables/{TABLE}/facets").json()
    assert {f["value"] for f in facets["label"]} == HERLEV_CODES and all(f["count"] == 12 for f in facets["label"])
    assert facets["tiles"] is False and client.get(f"/api/tables/{TILE_TABLE}/facets").json()["tiles"] is True
    page = client.get(f"/api/tables/{TABLE}/rows", params={"label": "NS", "limit": 5}).json()
    assert page["total"] == 12 and len(page["rows"]) == 5 and {r["label"] for r in page["rows"]} == {"NS"}
    picture = client.get(page["rows"][0]["thumbnail"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"


def test_search_by_id_with_filters(client: TestClient) -> None:
    got = client.get(f"/api/tables/{TABLE}/search", params={"id": QUERY, "k": 5}).json()
    assert len(got["hits"]) == 5 and QUERY not in [h["id"] for h in got["hits"]]
    assert sum(got["label_counts"].values()) == 5 and got["majority_label"] in HERLEV_CODES
    assert [h["rank"] for h in got["hits"]] == [1, 2, 3, 4, 5]
    assert client.get(got["hits"][0]["thumbnail"]).content[:2] == b"\xff\xd8"
    cis = client.get(f"/api/tables/{TABLE}/search", params={"id": QUERY, "k": 8, "label": "CIS"}).json()
    assert len(cis["hits"]) == 8 and {h["label"] for h in cis["hits"]} == {"CIS"}
    negative = client.get(f"/api/tables/{TABLE}/search", params={"id": QUERY, "k": 8, "binary": 0}).json()
    assert {h["binary_name"] for h in negative["hits"]} == {"negative"}


def test_search_by_upload_finds_the_stored_copy(client: TestClient, cell_image: Path) -> None:
    got = client.post(f"/api/tables/{TABLE}/search", files={"image": ("cell.jpg", cell_image.read_bytes())},
                      data={"k": "4"})
    assert got.status_code == 200, got.text
    assert got.json()["query"] == "upload cell.jpg"
    hits = got.json()["hits"]
    assert len(hits) == 4 and hits[0]["id"] == f"carcinoma_in_situ/{cell_image.name}"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_csv_and_geojson_exports(client: TestClient, store: Store, tmp_path: Path) -> None:
    csv = client.get(f"/api/tables/{TABLE}/search", params={"id": QUERY, "k": 4, "format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv") and "attachment" in csv.headers["content-disposition"]
    assert csv.text.splitlines()[0].startswith("rank,id,similarity") and len(csv.text.splitlines()) == 5
    tile = store.open(TILE_TABLE).read(["id"]).column("id")[3].as_py()
    got = client.get(f"/api/tables/{TILE_TABLE}/search", params={"id": tile, "k": 6}).json()
    assert set(got["overviews"]) == {"CMU-1-Small-Region"}
    overview = got["overviews"]["CMU-1-Small-Region"]
    assert (overview["width"], overview["height"]) == (2220, 2967)
    assert client.get(overview["url"]).content[:2] == b"\xff\xd8"
    geo = client.get(f"/api/tables/{TILE_TABLE}/search", params={"id": tile, "k": 6, "format": "geojson"})
    path = tmp_path / "hits.geojson"
    path.write_bytes(geo.content)
    annotations, problems = read_geojson(path)
    assert problems == [] and len(annotations) == 6
    assert [f["properties"]["objectType"] for f in json.loads(geo.content)["features"]] == ["tile"] * 6
    assert [a.bbox[:2] for a in annotations] == [(h["x"], h["y"]) for h in got["hits"]]


def test_unknown_names_are_404(client: TestClient) -> None:
    for url, params in [("/api/tables/nope/facets", {}), ("/api/tables/nope/rows", {}),
                        ("/api/tables/nope/search", {"id": QUERY}), (f"/api/tables/{TABLE}/search", {"id": "no/such"}),
                        (f"/api/tables/{TABLE}/thumbnail", {"id": "no/such"}), ("/api/overview", {"slide": "nope"}),
                        ("/api/tables/cmu/facets", {})]:  # `cmu` exists but holds tiles, not vectors
        _one_line_error(client.get(url, params=params), 404)


def test_no_request_reads_a_file(client: TestClient) -> None:
    """Ids, slides and table names that look like paths are looked up in the store, never opened."""
    secret = Path(__file__).resolve()
    for url, params in [(f"/api/tables/{TABLE}/thumbnail", {"id": str(secret)}),
                        (f"/api/tables/{TABLE}/search", {"id": "../../etc/passwd"}),
                        ("/api/overview", {"slide": str(secret)})]:
        _one_line_error(client.get(url, params=params), 404)
    assert client.get("/api/tables/..%2F..%2Fetc/facets").status_code == 404
    escaped = client.get("/static/..%2F..%2F..%2F..%2Ftests%2Ftest_serve.py")
    assert escaped.status_code == 404 and "def test_" not in escaped.text


def test_bad_uploads_and_parameters_are_one_line_errors(store: Store, cell_image: Path) -> None:
    client = TestClient(create_app(store.uri, max_upload_bytes=50_000, max_pixels=1_000_000))
    url = f"/api/tables/{TABLE}/search"
    assert "limit" in _one_line_error(client.post(url, files={"image": b"\0" * 200_000}), 413)
    assert "image" in _one_line_error(client.post(url, files={"image": b"not an image at all"}), 400)
    assert "image" in _one_line_error(client.post(url, files={"image": cell_image.read_bytes()[:300]}), 400)
    assert "pixels" in _one_line_error(client.post(url, files={"image": _png((1200, 1000), "1")}), 400)
    _one_line_error(client.get(url, params={"id": QUERY, "k": 0}), 422)
    _one_line_error(client.get(url, params={"id": QUERY, "format": "exe"}), 422)
    _one_line_error(client.post(url, files={"image": cell_image.read_bytes()}, data={"k": "many"}), 422)


def test_a_decompression_bomb_is_400_not_a_crash(store: Store) -> None:
    """PIL's own guard (an image over twice Image.MAX_IMAGE_PIXELS) with the server's pixel limit set above it."""
    bomb = _png((15_000, 15_000), "1")  # 225 M pixels in ~30 kB
    assert len(bomb) < 200_000
    client = TestClient(create_app(store.uri, max_pixels=10**12))
    assert "large" in _one_line_error(client.post(f"/api/tables/{TABLE}/search", files={"image": bomb}), 400)


def test_no_traceback_reaches_a_response(store: Store, monkeypatch) -> None:
    import cytoretrieve.views.web.service as service

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("secret internals\nTraceback (most recent call last)")

    monkeypatch.setattr(service, "search", broken)
    client = TestClient(create_app(store.uri), raise_server_exceptions=False)
    detail = _one_line_error(client.get(f"/api/tables/{TABLE}/search", params={"id": QUERY}), 500)
    assert "secret" not in detail


def test_token_required_when_set(store: Store) -> None:
    client = TestClient(create_app(store.uri, token="s3cret"))
    assert client.get("/api/tables").status_code == 401 and client.get("/").status_code == 401
    assert client.get("/api/tables", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/tables", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/", params={"token": "s3cret"}).status_code == 200  # sets the cookie the page then uses
    assert client.get("/api/tables").status_code == 200


def test_loopback_by_default_and_a_token_elsewhere(monkeypatch, capsys) -> None:
    monkeypatch.delenv("CYTORETRIEVE_TOKEN", raising=False)
    assert resolve_token("127.0.0.1", None, False) is None and resolve_token("::1", None, False) is None
    assert resolve_token("localhost", "t", False) == "t"
    with pytest.raises(CytoError, match="`token`"):
        resolve_token("0.0.0.0", None, False)
    assert resolve_token("0.0.0.0", None, True) is None
    monkeypatch.setenv("CYTORETRIEVE_TOKEN", "from-env")
    assert resolve_token("192.168.1.5", None, False) == "from-env"
    monkeypatch.delenv("CYTORETRIEVE_TOKEN")
    assert run(["serve", "--host", "0.0.0.0", "--store", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--token" in err and "--no-auth" in err


def test_a_table_that_grows_is_seen_and_a_dropped_one_is_404(herlev_root: Path, tmp_path: Path) -> None:
    store = herlev_store(herlev_root, tmp_path, per_class=3)
    client = TestClient(create_app(store.uri))
    before = client.get(f"/api/tables/{TABLE}/search", params={"id": QUERY, "k": 3}).json()
    writer = Store(store.uri).open(TABLE)  # another connection, as an `embed` job in another process has
    vector = writer.row_by_id(QUERY, ["vector"])["vector"]
    writer.add(writer.make_rows([{"id": "twin", "label": "NS"}], np.asarray([vector], np.float32) * 2))
    after = client.get(f"/api/tables/{TABLE}/search", params={"id": QUERY, "k": 3}).json()
    assert after["hits"][0]["id"] == "twin" and before["hits"][0]["id"] != "twin"
    assert client.get("/api/tables").json()[0]["rows"] == 22
    Store(store.uri).db.drop_table(TABLE)
    _one_line_error(client.get(f"/api/tables/{TABLE}/search", params={"id": QUERY, "k": 3}), 404)
    assert client.get("/api/tables").json() == []


def test_eight_concurrent_clients_fifty_mixed_queries_each(store: Store, cell_image: Path) -> None:
    import httpx

    from helpers.viewer_server import serving

    ids = store.open(TABLE).read(["id"]).column("id").to_pylist()
    upload = cell_image.read_bytes()

    def client_run(c: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=60) as http:
            for q in range(50):
                if q % 2:
                    r = http.post(f"{base}/api/tables/{TABLE}/search", files={"image": upload}, data={"k": "5"})
                else:
                    r = http.get(f"{base}/api/tables/{TABLE}/search", params={"id": ids[(c * 50 + q) % len(ids)], "k": 5})
                codes.append(r.status_code if r.status_code != 200 or len(r.json()["hits"]) == 5 else -1)
        return codes

    with serving(create_app(store.uri)) as base, ThreadPoolExecutor(8) as pool:
        codes = [code for result in pool.map(client_run, range(8)) for code in result]
    assert len(codes) == 400 and set(codes) == {200}
