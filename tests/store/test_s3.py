"""The store on object storage: every command of the spine against an S3 endpoint on loopback (moto in server mode,
started here on 127.0.0.1 and a free port, stopped at teardown; no cloud). Credentials and the endpoint come from
the standard AWS environment variables, as a user would set them; the store is `--store s3://bucket/path`.

What is covered: `tile` synthetic slides and `embed` their tile table, `embed` cells with two torchrun processes,
`classify`, `search`, `score --method retrieval`, kill -9 in the middle of `embed` then resume, and two machines
(two local cache folders) sharing one store, each keeping its own FAISS cache keyed to the table version.
Small synthetic data and resnet18 at 32 px keep it to about a minute of work.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("boto3", reason="S3 tests need boto3 and moto[server] (pip install -e '.[dev]')")
MOTO = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
if not Path(MOTO).exists():
    pytest.skip("S3 tests need moto[server] (its moto_server command): pip install -e '.[dev]'",
                allow_module_level=True)

from cytoretrieve.cli import run  # noqa: E402
from cytoretrieve.sources.cells.synthetic import make_cells  # noqa: E402
from cytoretrieve.store.index import forget_loaded, table_index  # noqa: E402
from cytoretrieve.store.tables import Store  # noqa: E402

EMBED = ["--backbone", "resnet18", "--weights", "random", "--image-size", "32", "--batch-size", "8",
         "--workers", "0"]
BUCKET = "cytoretrieve-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on 127.0.0.1 with one bucket; the AWS variables point at it for this module's tests."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_ENDPOINT": endpoint,
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache-machine-a"))}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on {endpoint}")
                time.sleep(0.2)
        os.environ.update(env)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def uri(s3) -> str:
    """A fresh store prefix in the bucket for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/store"


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    return make_cells(tmp_path_factory.mktemp("cells") / "cells", per_class=4, size=48)


def _cli(*args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CYTORETRIEVE_FAILPOINT": fault or ""}
    return subprocess.run([sys.executable, "-m", "cytoretrieve", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ids(uri: str, table: str) -> list[str]:
    return Store(uri).open(table).read(["id"]).column("id").to_pylist()


def _n_images(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def test_embed_with_two_torchrun_processes_then_classify_and_search(cells: Path, uri: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cytoretrieve", "embed", str(cells), "--label-map",
           str(cells / "label_map.json"), *EMBED, "--store", uri, "--table", "cells"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    # both ends of stderr: a failing rank's own error comes before torchrun's summary of it
    assert done.returncode == 0, done.stderr[:4000] + "\n...\n" + done.stderr[-2000:]
    added = [int(line.split(":")[1].split()[0]) for line in done.stdout.splitlines() if line.startswith("table cells:")]
    assert len(added) == 2 and all(n > 0 for n in added)  # both processes wrote their share
    ids = _ids(uri, "cells")
    assert len(ids) == len(set(ids)) == _n_images(cells)

    assert run(["classify", "--table", "cells", "--store", uri, "--runs", "2", "--k", "1,3",
                "--json", str(tmp_path / "classify.json")]) == 0
    result = json.loads((tmp_path / "classify.json").read_text())
    assert result  # one entry per table evaluated
    assert run(["search", "--id", ids[0], "--table", "cells", "--store", uri, "-k", "3",
                "--json", str(tmp_path / "hits.json")]) == 0
    hits = json.loads((tmp_path / "hits.json").read_text())
    found = [h["id"] for h in hits["hits"]]
    assert len(found) == 3 and ids[0] not in found and set(found) <= set(ids)
    # the FAISS cache of a remote store lives in this machine's cache folder, keyed to the table version
    cache = Store(uri).index_dir()
    assert str(cache).startswith(os.environ["XDG_CACHE_HOME"])
    meta = json.loads((cache / "cells.faiss.json").read_text())
    assert meta["version"] == Store(uri).open("cells").version and meta["rows"] == len(ids)


def test_tile_slides_then_embed_their_tiles_and_search(uri: str, tmp_path: Path) -> None:
    from helpers.synthetic_slides import write_standard_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(2):
        write_standard_slide(folder / f"case-{i}.tiff")
    assert run(["tile", str(folder), "--store", uri, "--table", "tiles"]) == 0
    assert run(["embed", "tiles", *EMBED, "--store", uri, "--table", "tiles_resnet18"]) == 0
    table = Store(uri).open("tiles_resnet18")
    rows = table.read(["id", "slide"]).to_pylist()
    assert {r["slide"] for r in rows} == {"case-0", "case-1"} and len({r["id"] for r in rows}) == len(rows)
    assert run(["search", "--id", rows[0]["id"], "--table", "tiles_resnet18", "--store", uri, "-k", "2",
                "--json", str(tmp_path / "hits.json")]) == 0
    hits = json.loads((tmp_path / "hits.json").read_text())["hits"]
    assert len(hits) == 2 and all(h["slide"] in ("case-0", "case-1") for h in hits)


def test_score_retrieval_on_a_remote_store_matches_a_local_one(uri: str, tmp_path: Path) -> None:
    from cytoretrieve.queries.mil.bags import bags_to_table, write_group_labels
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split
    from helpers.mil_synthetic import synthetic_bags

    bags, _ = synthetic_bags(24, shift=8.0, seed=3)
    labels = write_group_labels(bags, tmp_path / "slides.csv")
    split, _ = make_split(read_labels(labels), folds=3, seed=0)
    write_split(split, tmp_path / "split.json")
    scored = {}
    for where in (uri, str(tmp_path / "local")):
        bags_to_table(Store(where), "tiles", bags)
        out = tmp_path / f"score-{len(scored)}.json"
        assert run(["score", "--tiles", "tiles", "--labels", str(labels), "--split", str(tmp_path / "split.json"),
                    "--store", where, "--method", "retrieval", "--json", str(out)]) == 0
        scored[where] = json.loads(out.read_text())
    remote, local = scored[uri], scored[str(tmp_path / "local")]
    assert sorted(remote["slides"]) == sorted(bags.names)
    assert remote["slides"] == local["slides"] and remote["scores"] == pytest.approx(local["scores"])


def test_embed_killed_mid_way_resumes_with_every_row_once(cells: Path, uri: str) -> None:
    args = ["embed", str(cells), *EMBED, "--commit-rows", "8", "--store", uri, "--table", "cells"]
    killed = _cli(*args, fault="commit:2")
    assert killed.returncode == -9
    stored = Store(uri).open("cells").count()  # the table opens at its last commit
    assert 0 < stored < _n_images(cells)
    rerun = _cli(*args)  # the dead job's lease (in this machine's cache folder) is stale: taken over
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = _ids(uri, "cells")
    assert len(ids) == len(set(ids)) == _n_images(cells)


def test_two_machines_each_keep_their_index_cache_in_step(cells: Path, uri: str, tmp_path: Path,
                                                          monkeypatch) -> None:
    """Machine A builds its cache; machine B appends rows and builds its own; A's next search picks up B's rows
    (its cache is updated to the new table version, not trusted as it was)."""
    from cytoretrieve.queries.search import search

    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    first = sorted(cells.rglob("*.png"))[:12]
    part = tmp_path / "part"
    for p in first:
        dest = part / p.relative_to(cells)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    monkeypatch.setenv("XDG_CACHE_HOME", str(machine_a))
    assert run(["embed", str(part), *EMBED, "--store", uri, "--table", "cells"]) == 0
    table = Store(uri).open("cells")
    query = table.read(["id"]).column("id").to_pylist()[0]
    index_a = table_index(table)
    assert index_a.rows == 12 and (Store(uri).index_dir() / "cells.faiss").exists()

    monkeypatch.setenv("XDG_CACHE_HOME", str(machine_b))
    forget_loaded()  # another machine: another process
    assert run(["embed", str(cells), *EMBED, "--store", uri, "--table", "cells"]) == 0  # adds the other images
    table_b = Store(uri).open("cells")
    hits_b = search(table_b, row_id=query, k=5)
    assert table_index(table_b).rows == _n_images(cells)

    monkeypatch.setenv("XDG_CACHE_HOME", str(machine_a))
    forget_loaded()
    table_a = Store(uri).open("cells")
    hits_a = search(table_a, row_id=query, k=5)
    assert [h.id for h in hits_a.hits] == [h.id for h in hits_b.hits]
    for machine in (machine_a, machine_b):
        caches = list(machine.rglob("cells.faiss.json"))
        assert len(caches) == 1, caches
        meta = json.loads(caches[0].read_text())
        assert meta["version"] == table_a.version and meta["rows"] == _n_images(cells)


def test_storage_options_stand_in_for_the_environment(s3: str, uri: str, monkeypatch) -> None:
    import numpy as np

    options = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "aws_endpoint": s3,
               "aws_region": "us-east-1", "allow_http": "true"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT", "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(name)
    store = Store(uri, storage_options=options)
    table = store.create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": 4}, {"name": "toy"})
    table.add(table.make_rows([{"id": f"r{i}"} for i in range(3)], np.eye(3, 4, dtype=np.float32)))
    table.finish()
    assert Store(uri, storage_options=options).open("t").count() == 3


READER = """
import json, sys
from cytoretrieve.queries import search as searching
from cytoretrieve.store.index import table_index
from cytoretrieve.store.tables import Store
searching.SCALE_SAMPLE = 100  # the similarity scale's sample: small, for speed
uri = sys.argv[1]
for line in sys.stdin:
    table = Store(uri).open("t")  # as the viewer does: the table afresh per query
    found = searching.search(table, row_id=line.strip(), k=10)
    print(json.dumps({"kind": table_index(table).kind, "hits": [h.id for h in found.hits]}), flush=True)
"""


def test_two_readers_share_the_lance_index_while_a_writer_appends(uri: str, tmp_path: Path) -> None:
    """Two reader processes (two machines: separate cache folders) search one S3 store through its lance index
    while this process appends rows near the query; each finds the new rows on its next query, before and after
    a reader folds them into the index."""
    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16))
    x = (centres[rng.integers(0, 8, 600)] + 0.3 * rng.normal(size=(600, 16))).astype(np.float32)
    table = Store(uri).create_or_open("t", {"arch": "x", "fingerprint": "f" * 64, "dim": 16}, {"name": "toy"})
    table.add(table.make_rows([{"id": f"r{i}"} for i in range(600)], x))
    table.finish()
    assert run(["index", "build", "--table", "t", "--store", uri, "--kind", "lance"]) == 0
    readers = [subprocess.Popen([sys.executable, "-c", READER, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / f"machine-{m}")})
               for m in "ab"]

    def ask() -> list[dict]:
        for r in readers:
            r.stdin.write("r7\n")
            r.stdin.flush()
        return [json.loads(r.stdout.readline()) for r in readers]

    try:
        before = ask()
        assert [b["kind"] for b in before] == ["lance", "lance"] and before[0]["hits"] == before[1]["hits"]
        for batch in range(2):  # 20 rows (under the fold threshold: searched flat), then 20 more (folded in)
            near = x[7] + 0.01 * rng.normal(size=(20, 16)).astype(np.float32)
            table.add(table.make_rows([{"id": f"n{batch}-{i}"} for i in range(20)], near))
            answers = ask()
            for a in answers:
                assert a["kind"] == "lance"
                assert sum(h.startswith(f"n{batch}-") for h in a["hits"]) >= 3, a
        t = Store(uri).open("t")
        from cytoretrieve.store import lance_index

        stats = t.tbl.index_stats(lance_index.vector_index(t).name)
        assert stats.num_indexed_rows + stats.num_unindexed_rows == t.count() == 640
        assert stats.num_indexed_rows == 640  # a reader folded the appended rows in
        assert sorted(_ids(uri, "t")) == sorted({*(f"r{i}" for i in range(600)),
                                                 *(f"n{b}-{i}" for b in range(2) for i in range(20))})
    finally:
        for r in readers:
            r.stdin.close()
            r.wait(timeout=60)
