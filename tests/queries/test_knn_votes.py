"""The vote registry: a toy vote registered here, and only here, is used by `classify` (Python and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.queries import knn
from cytoretrieve.store.tables import Store


def _nearest(codes: np.ndarray, sims: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    """Every k votes as its nearest neighbour does: 1-NN whatever k."""
    return np.repeat(codes[:, :1], codes.shape[1], axis=1)


@pytest.fixture
def toy(monkeypatch) -> knn.Vote:
    """The toy vote in a copy of the registry, gone after the test."""
    monkeypatch.setattr(knn, "VOTES", knn.VOTES.copy())
    return knn.register_vote("nearest", _nearest, "the nearest neighbour's class")


def _clusters(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 8)) * 3
    y = np.repeat(np.arange(3), 20)
    return (centres[y] + rng.normal(size=(60, 8))).astype(np.float32), ["abc"[i] for i in y]


def test_a_registered_vote_is_used_by_classify(toy) -> None:
    x, labels = _clusters()
    res = knn.classify(x, labels, ks=range(1, 8), vote="nearest", runs=2)
    one_nn = knn.classify(x, labels, ks=[1], vote="majority", runs=2)
    assert res.vote == "nearest" and len(set(res.f1_curve_mean)) == 1  # every k is 1-NN
    assert res.f1_curve_mean[0] == one_nn.f1_curve_mean[0]
    assert "nearest" in knn.votes_help() and "weighted" in knn.votes_help()


def test_a_registered_vote_is_used_by_the_cli(toy, tmp_path: Path, capsys) -> None:
    x, labels = _clusters(1)
    store = Store(tmp_path / "s")
    t = store.create_or_open("cells_toy", {"arch": "toy", "fingerprint": "7" * 64, "dim": 8}, {"name": "cells"})
    t.add(t.make_rows([{"id": f"r{i}", "label": lab} for i, lab in enumerate(labels)], x))
    out = tmp_path / "c.json"
    assert run(["classify", "--table", "cells_toy", "--store", store.uri, "--vote", "nearest", "--k", "1-5",
                "--runs", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["vote"] == "nearest"
    assert run(["classify", "--table", "cells_toy", "--store", store.uri, "--vote", "loud"]) == 2
    assert "unknown vote 'loud': use one of majority, weighted, nearest" in capsys.readouterr().err
