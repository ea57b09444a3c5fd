"""The MIL method registry: a toy method registered here, and only here, is scored by `score` end to end (the
Python `score_table` and the CLI); the split is checked once per score and the table opened once."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil import bags as bags_module
from cytoretrieve.queries.mil import methods
from cytoretrieve.queries.mil.bags import Bags, bags_to_table, write_group_labels
from cytoretrieve.queries.mil.score import score_table
from cytoretrieve.sources.cohort.labels import read_labels
from cytoretrieve.sources.cohort.split import make_split, write_split
from cytoretrieve.store.tables import Store
from helpers.mil_synthetic import synthetic_bags


class _FirstFeatureMax:
    """Tile score = its first feature (where the synthetic positives are shifted); slide score = the largest."""

    def predict(self, vectors: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        tiles = [np.asarray(vectors[i])[:, 0].astype(np.float64) for i in range(len(vectors))]
        return np.array([t.max() for t in tiles]), tiles


def _fit_toy(bags: Bags, positives: np.ndarray | None, config: object) -> _FirstFeatureMax:
    assert positives is None and config is None  # a method reading no config gets none
    return _FirstFeatureMax()


@pytest.fixture
def toy(monkeypatch) -> methods.MILMethod:
    """The toy method in a copy of the registry, gone after the test."""
    monkeypatch.setattr(methods, "METHODS", methods.METHODS.copy())
    return methods.register_mil_method("toymax", _fit_toy, "max of the first feature")


@pytest.fixture
def cohort(tmp_path: Path):
    """A store table of 30 synthetic slides, their labels CSV and a 3-fold split."""
    bags, _ = synthetic_bags(30, shift=8.0, seed=3)
    store = Store(tmp_path / "store")
    bags_to_table(store, "tiles", bags)
    labels = write_group_labels(bags, tmp_path / "slides.csv")
    split, _ = make_split(read_labels(labels), folds=3, seed=0)
    write_split(split, tmp_path / "split.json")
    return store, labels, tmp_path / "split.json"


@pytest.fixture
def split_checks(monkeypatch) -> list[int]:
    """Counts `check_split` calls."""
    calls: list[int] = []
    original = bags_module.check_split

    def counted(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        calls.append(1)
        original(*args, **kwargs)

    monkeypatch.setattr(bags_module, "check_split", counted)
    return calls


def test_a_registered_method_is_scored_by_score_table(toy, cohort, split_checks) -> None:
    store, labels, split = cohort
    result, bags, table = score_table(store, "tiles", labels, split, "toymax")
    assert toy.trains is False and result.method == "toymax" and result.config == {}
    assert table.name == "tiles" and len(bags) == len(result.slides) == 30
    assert result.mean["auc"] == 1.0  # the positives' shifted feature gives each positive slide the larger max
    assert result.tile_scores[bags.names[1]] == [float(v) for v in bags.vectors[1][:, 0]]
    assert len(split_checks) == 1


def test_a_registered_method_is_scored_by_the_cli(toy, cohort, split_checks, monkeypatch, tmp_path: Path) -> None:
    store, labels, split = cohort
    opened: list[str] = []
    original_open = Store.open

    def counted_open(self, name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        opened.append(name)
        return original_open(self, name, *args, **kwargs)

    monkeypatch.setattr(Store, "open", counted_open)
    out = tmp_path / "out"
    assert run(["score", "--tiles", "tiles", "--labels", str(labels), "--split", str(split), "--store", store.uri,
                "--method", "toymax", "--json", str(tmp_path / "toy.json"), "--out", str(out)]) == 0
    res = json.loads((tmp_path / "toy.json").read_text())
    assert res["method"] == "toymax" and res["mean"]["auc"] == 1.0 and len(res["slides"]) == 30
    assert (out / "scores.csv").read_text().count("\n") == 31 and (out / "roc.png").exists()
    assert len(split_checks) == 1 and opened == ["tiles"]  # checked once; the outputs reuse the opened table


def test_the_registry_decides_what_a_method_accepts(toy, cohort, capsys) -> None:
    store, labels, split = cohort
    base = ["score", "--tiles", "tiles", "--labels", str(labels), "--split", str(split), "--store", store.uri]
    assert run([*base, "--method", "toymax", "--augment-positives", "0.5", "--positives", "tiles"]) == 2
    assert "--method toymax trains none" in capsys.readouterr().err
    assert run([*base, "--method", "toymax", "--positives", "tiles"]) == 2
    assert "used by --method retrieval" in capsys.readouterr().err
    with pytest.raises(CytoError, match="unknown MIL method 'nothing': use one of abmil, .*toymax"):
        methods.get_method("nothing")


def test_every_trained_method_has_its_pooling() -> None:
    from cytoretrieve.queries.mil.models import POOLINGS

    trained = {m.name: m for m in methods.METHODS.values() if m.trains}
    assert set(trained) == set(POOLINGS) and all(m.defaults == {"method": n} for n, m in trained.items())
    assert methods.method_config(trained["gated"]).method == "gated"
    assert methods.method_config(methods.METHODS["retrieval"]).to_dict()["references"] == "centroids"
