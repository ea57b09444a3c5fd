"""The label log: append-only events, current review = latest event, undo as an event, refusals that write nothing,
CSV / QuPath GeoJSON both ways, the `labels` CLI, and concurrent writers (threads and processes) losing nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.queries.labels import current_reviews, history, review_counts
from cytoretrieve.store.labels import (
    LABELS_TABLE,
    LabelInput,
    latest_events,
    read_events,
    record_labels,
    undo,
)
from cytoretrieve.store.tables import Store
from helpers.label_tables import TABLE, toy_store, toy_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return toy_store(tmp_path)


def _stored_labels(store: Store) -> list:
    return store.open(TABLE).read(["id", "label", "binary"]).to_pylist()


def test_events_are_appended_and_the_latest_is_the_review(store: Store) -> None:
    before = _stored_labels(store)
    first = record_labels(store, TABLE, [LabelInput("A/0", "B", note="looks dysplastic")], reviewer="ana")[0]
    assert (first.label, first.binary, first.reviewer, first.source, first.supersedes) == ("B", 1, "ana", "expert", None)
    second = record_labels(store, TABLE, [LabelInput("A/0", "C")], reviewer="bob")[0]
    assert second.supersedes == first.event and second.binary == 1
    assert latest_events(store, TABLE)["A/0"].event == second.event
    assert [e["label"] for e in history(store, TABLE, "A/0")] == ["B", "C"]
    assert _stored_labels(store) == before  # the embed-time labels are never touched
    assert LABELS_TABLE in store.table_names() and all(t.name != LABELS_TABLE for t in [store.open(TABLE)])
    reviews = current_reviews(store.open(TABLE))
    assert [(r["id"], r["label"], r["stored_label"], r["disagrees"]) for r in reviews] == [("A/0", "C", "A", True)]
    assert review_counts(store, TABLE)["events"] == 2 and review_counts(store, TABLE)["reviewed_rows"] == 1


def test_undo_is_an_event_and_undoing_it_redoes(store: Store) -> None:
    a = record_labels(store, TABLE, [LabelInput("A/1", "B")], reviewer="ana")[0]
    b = record_labels(store, TABLE, [LabelInput("A/1", "C")], reviewer="ana")[0]
    u1 = undo(store, TABLE, "A/1", "ana")
    assert (u1.action, u1.label, u1.supersedes) == ("undo", "B", b.event)
    u2 = undo(store, TABLE, "A/1", "ana")
    assert (u2.label, u2.supersedes) == ("C", u1.event)  # undoing the undo gives its label back
    record_labels(store, TABLE, [LabelInput("A/2", "B")], reviewer="ana")
    u3 = undo(store, TABLE, "A/2", "ana")
    assert u3.label is None  # back to no review: the stored label applies again
    assert [e["action"] for e in history(store, TABLE, "A/1")] == ["label", "label", "undo", "undo"]
    assert read_events(store, TABLE).num_rows == 6 and a.event != b.event
    with pytest.raises(CytoError, match="no review to undo"):
        undo(store, TABLE, "B/0", "ana")


def test_refusals_write_nothing(store: Store) -> None:
    with pytest.raises(CytoError, match="not among the classes") as e:
        record_labels(store, TABLE, [LabelInput("A/0", "B"), LabelInput("A/1", "HSIL")], reviewer="ana")
    assert "\n" not in str(e.value)
    with pytest.raises(CytoError, match="not in table"):
        record_labels(store, TABLE, [LabelInput("A/0", "B"), LabelInput("nope", "B")], reviewer="ana")
    with pytest.raises(CytoError, match="source"):
        record_labels(store, TABLE, [LabelInput("A/0", "B")], source="guess")
    assert read_events(store, TABLE).num_rows == 0
    new = record_labels(store, TABLE, [LabelInput("A/1", "HSIL")], reviewer="ana", new_class=True, binary=1)[0]
    assert new.binary == 1
    assert record_labels(store, TABLE, [LabelInput("A/2", "HSIL")], reviewer="ana")[0].binary == 1  # known now
    assert record_labels(store, TABLE, [LabelInput("A/3", "unsure")], reviewer="ana")[0].binary is None


def test_concurrent_threads_lose_nothing(store: Store) -> None:
    n = 40

    def writer(name: str) -> None:
        for i in range(n):
            record_labels(store, TABLE, [LabelInput(f"B/{i % 4}", "C" if i % 2 else "A", note=f"{name}:{i}")],
                          reviewer=name)

    threads = [threading.Thread(target=writer, args=(w,)) for w in ("ana", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = read_events(store, TABLE).to_pylist()
    assert len(log) == 2 * n and len({e["event"] for e in log}) == 2 * n
    for w in ("ana", "bob"):  # every row's events of one writer are in the order written
        for row in range(4):
            seq = [int(e["note"].split(":")[1]) for e in log if e["reviewer"] == w and e["row_id"] == f"B/{row}"]
            assert seq == sorted(seq) and len(seq) == n // 4
    _one_chain_per_row(log)


def _one_chain_per_row(log: list[dict]) -> None:
    """Each row's events, in log order, form one chain: each supersedes the one before it (no fork, where two
    writers read the same current review and both supersede it)."""
    rows: dict[str, list[dict]] = {}
    for e in log:
        rows.setdefault(e["row_id"], []).append(e)
    for events in rows.values():
        assert [e["supersedes"] for e in events] == [None] + [e["event"] for e in events[:-1]]


WRITER = textwrap.dedent("""
    import sys
    from cytoretrieve.store.labels import LabelInput, record_labels
    from cytoretrieve.store.tables import Store
    store, name, n = Store(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(n):
        record_labels(store, "toy_r18", [LabelInput(f"C/{i % 5}", "B", note=f"{name}:{i}")], reviewer=name)
""")


def test_concurrent_processes_lose_nothing(store: Store) -> None:
    n = 60
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, store.uri, w, str(n)], cwd=ROOT) for w in ("p1", "p2")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    log = read_events(store, TABLE).to_pylist()
    assert len(log) == 2 * n and len({e["event"] for e in log}) == 2 * n
    for w in ("p1", "p2"):
        seq = [int(e["note"].split(":")[1]) for e in log if e["reviewer"] == w]
        assert seq == list(range(n))  # each writer's events in the order written, none lost or repeated
    _one_chain_per_row(log)


def test_csv_and_geojson_both_ways(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    toy_table(st, "tiles_r18", slides=True)
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("id,label,reviewer,note\ns0@0,0,64,B,ana,first\ns1@64,0,64,A,,\n".replace("@0,0,64", "@0,0,64")
                      .replace("s0@0,0,64,B", '"s0@0,0,64",B').replace("s1@64,0,64,A", '"s1@64,0,64",A'))
    assert run(["labels", "import", str(csv_in), "--table", "tiles_r18", "--store", st.uri, "--reviewer", "rev"]) == 0
    reviews = {r["id"]: r for r in current_reviews(st.open("tiles_r18"))}
    assert {k: (r["label"], r["reviewer"], r["source"]) for k, r in reviews.items()} == {
        "s0@0,0,64": ("B", "ana", "import"), "s1@64,0,64": ("A", "rev", "import")}
    out = tmp_path / "out.geojson"
    assert run(["labels", "export", "--table", "tiles_r18", "--store", st.uri, "--out", str(out)]) == 0
    features = json.loads(out.read_text())["features"]
    assert {f["properties"]["name"]: f["properties"]["classification"]["name"] for f in features} == {
        "s0@0,0,64": "B", "s1@64,0,64": "A"}
    assert features[0]["geometry"]["type"] == "Polygon"
    # QuPath edits the class of one object and the file comes back
    for f in features:
        if f["properties"]["name"] == "s1@64,0,64":
            f["properties"]["classification"]["name"] = "C"
    edited = tmp_path / "edited.geojson"
    edited.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    assert run(["labels", "import", str(edited), "--table", "tiles_r18", "--store", st.uri, "--reviewer", "q"]) == 0
    assert latest_events(st, "tiles_r18")["s1@64,0,64"].label == "C"
    csv_out = tmp_path / "out.csv"
    assert run(["labels", "export", "--table", "tiles_r18", "--store", st.uri, "--out", str(csv_out)]) == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("id,label,reviewer,note,stored_label") and len(lines) == 3


def test_cli_add_list_history_undo_and_refusal(store: Store, capsys: pytest.CaptureFixture) -> None:
    base = ["--table", TABLE, "--store", store.uri]
    assert run(["labels", "add", *base, "--id", "A/0", "--id", "A/1", "--label", "B", "--reviewer", "ana"]) == 0
    assert "labelled A/0: B by ana" in capsys.readouterr().out
    assert run(["labels", "add", *base, "--id", "A/0", "--label", "HSIL", "--reviewer", "ana"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not among the classes" in err and "--new-class" in err
    assert run(["labels", "undo", *base, "--id", "A/0", "--reviewer", "ana"]) == 0
    assert run(["labels", "history", *base, "--id", "A/0"]) == 0
    out = capsys.readouterr().out
    assert "label B" in out and "undo  (no review)" in out
    assert run(["labels", "list", *base, "--json", "-"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed["reviews"]] == ["A/1"] and listed["counts"]["events"] == 3
    bad = store.uri + "/../bad.csv"
    Path(bad).write_text("id,label\nA/0,B\nA/1,ZZZ\n")
    assert run(["labels", "import", bad, *base]) == 2
    assert read_events(store, TABLE).num_rows == 3  # the refused file wrote nothing
