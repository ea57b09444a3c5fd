"""Queries on reviewed labels: classify, transfer, search --evaluate and score's positives use the label log's reviews
with labels="reviewed" (and say so), the stored ones by default; `suggest` ranks unreviewed rows by the margin of
the k-NN vote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.queries.knn import classify_table, vote_margin
from cytoretrieve.queries.labels import labelled_vectors
from cytoretrieve.queries.mil.bags import load_positives
from cytoretrieve.queries.review_queue import suggest
from cytoretrieve.queries.search_eval import evaluate_search
from cytoretrieve.queries.transfer import transfer
from cytoretrieve.store.labels import LabelInput, record_labels
from cytoretrieve.store.tables import Store
from helpers.label_tables import TABLE, toy_store, toy_table


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    st = toy_store(tmp_path_factory.mktemp("reviewed"))
    toy_table(st, "target_r18", per_class=4, seed=1)
    # every C row is really B; one A row is unsure; target: two A rows are really B (positive)
    record_labels(st, TABLE, [LabelInput(f"C/{i}", "B") for i in range(10)] + [LabelInput("A/0", "unsure")],
                  reviewer="ana")
    record_labels(st, "target_r18", [LabelInput("A/0", "B"), LabelInput("A/1", "B")], reviewer="ana")
    return st


def test_labelled_vectors_swap_only_with_reviewed(store: Store) -> None:
    table = store.open(TABLE)
    _, stored, used = labelled_vectors(table, ["id", "label", "binary"])
    _, reviewed, used_r = labelled_vectors(table, ["id", "label", "binary"], "reviewed")
    assert set(stored.column("label").to_pylist()) == {"A", "B", "C"}
    assert sorted(set(reviewed.column("label").to_pylist()) - {None}) == ["A", "B"]
    assert reviewed.column("label").to_pylist().count(None) == 1  # the unsure row is left out
    assert (used.labels, used.reviewed_rows) == ("stored", 11)
    assert (used_r.labels, used_r.reviewed_rows, used_r.changed_rows, used_r.unsure_rows) == ("reviewed", 11, 11, 1)
    with pytest.raises(CytoError, match="`labels`"):
        labelled_vectors(table, ["id"], "mine")


def test_classify_on_reviewed_labels(store: Store) -> None:
    table = store.open(TABLE)
    stored = classify_table(table, runs=2, ks=[1, 3], train_fraction=0.5)
    reviewed = classify_table(table, labels="reviewed", runs=2, ks=[1, 3], train_fraction=0.5)
    assert stored.classes == ["A", "B", "C"] and reviewed.classes == ["A", "B"]
    assert (stored.labels, reviewed.labels, reviewed.reviewed_rows) == ("stored", "reviewed", 11)
    assert reviewed.n_train + reviewed.n_test == 29 and reviewed.n_unlabelled == 1


def test_transfer_on_reviewed_labels(store: Store) -> None:
    stored = transfer([store.open(TABLE)], store.open("target_r18"), k=3)
    reviewed = transfer([store.open(TABLE)], store.open("target_r18"), k=3, labels="reviewed")
    assert stored.n_target_positive == 8 and reviewed.n_target_positive == 10  # two A rows reviewed as B
    assert reviewed.labels == "reviewed" and reviewed.reviewed_rows == {TABLE: 11, "target_r18": 2}
    assert reviewed.n_support == 29  # the unsure row is left out of the support


def test_search_evaluation_and_positives_on_reviewed_labels(store: Store) -> None:
    table = store.open(TABLE)
    stored = evaluate_search(table, [1])
    reviewed = evaluate_search(table, [1], labels="reviewed")
    names = {c.name for c in reviewed.evaluations[0].classes}
    assert names == {"A", "B"} and {c.name for c in stored.evaluations[0].classes} == {"A", "B", "C"}
    assert (reviewed.labels, reviewed.reviewed_rows) == ("reviewed", 11)
    assert len(load_positives(table)) == 20 and len(load_positives(table, "reviewed")) == 20
    target = store.open("target_r18")
    assert len(load_positives(target)) == 8 and len(load_positives(target, "reviewed")) == 10


def test_vote_margin() -> None:
    codes = np.array([[0, 0, 0], [0, 1, 1], [0, 1, 2]])
    sims = np.ones((3, 3))
    winner, margin = vote_margin(codes, sims, 3, "majority", 1.0)
    assert winner.tolist() == [0, 1, 0] and margin == pytest.approx([1.0, 1 / 3, 0.0])
    _, weighted = vote_margin(np.array([[0, 1]]), np.array([[0.9, 0.5]]), 2, "weighted", 0.1)
    assert 0.9 < weighted[0] < 1.0  # the nearer neighbour outweighs the farther one


def test_suggest_ranks_unsure_rows_first(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    toy_table(st, slides=True)
    # half of cluster A (slide s0) reviewed as B: the rest of s0 is where the vote is unsure
    record_labels(st, TABLE, [LabelInput(f"s0@{i * 64},0,64", "B") for i in range(5)], reviewer="ana")
    result = suggest(st.open(TABLE), 8, k=6)
    assert len(result.rows) == 8 and result.candidates == 25 and result.labelled_rows == 30
    margins = [r.margin for r in result.rows]
    assert margins == sorted(margins)
    assert [r.slide for r in result.rows[:5]] == ["s0"] * 5  # the unreviewed A rows among the B reviews
    assert all(r.id not in {f"s0@{i * 64},0,64" for i in range(5)} for r in result.rows)
    only = suggest(st.open(TABLE), 50, slide="s2")
    assert {r.slide for r in only.rows} == {"s2"} and only.candidates == 10
    in_class = suggest(st.open(TABLE), 50, klass="C")
    assert {r.stored_label for r in in_class.rows} == {"C"}


def test_cli_labels_option(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c.json"
    assert run(["classify", "--table", TABLE, "--store", store.uri, "--k", "1,3", "--runs", "2",
                "--labels", "reviewed", "--json", str(out)]) == 0
    assert "reviewed labels, 11 row(s) carry a review" in capsys.readouterr().out
    r = json.loads(out.read_text())["results"][0]
    assert (r["labels"], r["reviewed_rows"], r["classes"]) == ("reviewed", 11, ["A", "B"])
    assert run(["search", "--evaluate", "--table", TABLE, "--store", store.uri, "--k", "1", "--labels", "reviewed",
                "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == "reviewed"
    assert run(["transfer", "--support", TABLE, "--target", "target_r18", "--store", store.uri, "--k", "3",
                "--labels", "reviewed"]) == 0
    assert "reviewed labels; rows carrying a review: toy_r18 11, target_r18 2" in capsys.readouterr().out
    assert run(["classify", "--table", TABLE, "--store", store.uri, "--labels", "mine"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert run(["labels", "suggest", "--table", TABLE, "--store", store.uri, "-n", "3", "--json", "-"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 3


def test_score_positives_on_reviewed_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cytoretrieve.queries.mil.bags import bags_to_table, write_group_labels
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split
    from helpers.mil_synthetic import synthetic_bags

    bags, _ = synthetic_bags(24, shift=8.0, seed=3)
    st = Store(tmp_path / "store")
    table = bags_to_table(st, "tiles", bags)
    labels = write_group_labels(bags, tmp_path / "slides.csv")
    write_split(make_split(read_labels(labels), folds=4, seed=0)[0], tmp_path / "split.json")
    stored = len(load_positives(table))
    record_labels(st, "tiles", [LabelInput("slide-000#0", "1"), LabelInput("slide-000#1", "1")], reviewer="ana")
    assert len(load_positives(st.open("tiles"), "reviewed")) == stored + 2
    args = ["score", "--tiles", "tiles", "--labels", str(labels), "--split", str(tmp_path / "split.json"), "--store",
            st.uri, "--method", "retrieval", "--positives", "tiles", "--device", "cpu"]
    assert run([*args, "--row-labels", "reviewed", "--json", str(tmp_path / "s.json")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"positives: {stored + 2} rows of tiles by their reviewed labels (2 row(s) carry a review)" in out
    used = json.loads((tmp_path / "s.json").read_text())["config"]["positives_labels"]
    assert used == {"labels": "reviewed", "table": "tiles", "reviewed_rows": 2, "positives": stored + 2}
    assert run([*args, "--row-labels", "mine"]) == 2
