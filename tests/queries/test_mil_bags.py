"""Bags from a vector table + a group-label file, the MIL benchmark readers, and `cytoretrieve score` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil.bags import bags_to_table, load_bags, write_group_labels
from cytoretrieve.sources.cohort.labels import read_labels
from cytoretrieve.sources.cohort.split import make_split, write_split
from cytoretrieve.store.tables import Store
from experiments.mil_data import read_npz, read_prtools_mat
from helpers.mil_synthetic import synthetic_bags
from helpers.paths import MIL


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and OpenMP threads spinning on a shared 2-core machine cost 10x."""
    import faiss
    import torch

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


def test_musk1_readers_give_the_verified_counts() -> None:
    if not MIL.is_dir():
        pytest.skip(f"MIL benchmarks not found at {MIL}")
    npz = read_npz(MIL / "npz" / "musk1.npz")
    assert (len(npz), npz.instances, int(npz.y.sum()), npz.dim) == (92, 476, 47, 166)  # SOURCE.md: 92 / 476, 47 + bags
    assert sum(len(v) for v, y in zip(npz.vectors, npz.y) if y) == 207
    mat = read_prtools_mat(MIL / "raw" / "miproblems_prtools_mat" / "musk1.mat")
    assert mat.names == npz.names and np.array_equal(mat.y, npz.y)
    assert all(np.array_equal(a, b) for a, b in zip(mat.vectors, npz.vectors))


def test_bad_benchmark_files_are_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    np.savez(bad, X=np.zeros((3, 2)))
    with pytest.raises(CytoError, match="not a MIL benchmark"):
        read_npz(bad)
    (tmp_path / "y.mat").write_bytes(b"not matlab")
    with pytest.raises(CytoError, match="not a PRTools"):
        read_prtools_mat(tmp_path / "y.mat")


@pytest.fixture
def cohort(tmp_path: Path):
    """A store table of 42 synthetic slides, a labels CSV for 40 of them (2 unlabelled), and a 4-fold split."""
    bags, _ = synthetic_bags(42, shift=8.0, seed=3)
    store = Store(tmp_path / "store")
    bags_to_table(store, "tiles", bags)
    labelled = bags.subset(range(40))
    labels = write_group_labels(labelled, tmp_path / "slides.csv")
    split, _ = make_split(read_labels(labels), folds=4, seed=0)
    write_split(split, tmp_path / "split.json")
    return store, bags, labels, tmp_path / "split.json"


def test_load_bags_streams_labelled_groups_and_counts_the_rest(cohort) -> None:
    store, bags, labels, _ = cohort
    loaded = load_bags(store.open("tiles"), labels)
    assert loaded.names == bags.names[:40] and np.array_equal(loaded.y, bags.y[:40])
    for name, v, ids in zip(loaded.names, loaded.vectors, loaded.ids):
        ref = bags.vectors[bags.names.index(name)]
        assert v.shape == ref.shape and all(i.startswith(name + "#") for i in ids)
        order = [int(i.split("#")[1]) for i in ids]
        np.testing.assert_allclose(v, ref[order])
    assert loaded.unlabelled_groups == 2
    assert loaded.unlabelled_rows == len(bags.vectors[40]) + len(bags.vectors[41])


def test_streamed_bags_read_the_same_vectors_bag_by_bag(cohort) -> None:
    from cytoretrieve.queries.mil.bags import StoredVectors

    store, _, labels, _ = cohort
    held = load_bags(store.open("tiles"), labels, stream=False)
    streamed = load_bags(store.open("tiles"), labels, stream=True)
    assert isinstance(streamed.vectors, StoredVectors) and not isinstance(held.vectors, StoredVectors)
    assert streamed.names == held.names and streamed.ids == held.ids and streamed.dim == held.dim
    assert streamed.instances == held.instances
    for i in (0, 7, len(held) - 1):
        np.testing.assert_array_equal(streamed.vectors[i], held.vectors[i])
    part = streamed.subset([3, 1])
    assert isinstance(part.vectors, StoredVectors) and part.names == [held.names[3], held.names[1]]
    np.testing.assert_array_equal(part.vectors[1], held.vectors[1])
    assert [len(v) for v in part.vectors[0:2]] == [len(held.vectors[3]), len(held.vectors[1])]
    with pytest.raises(IndexError):
        part.vectors[2]


def test_scoring_streamed_bags_gives_the_in_memory_result(cohort) -> None:
    from cytoretrieve.queries.mil.evaluate import cross_validate
    from cytoretrieve.queries.mil.train import MILTrainConfig
    from cytoretrieve.sources.cohort.split import load_split

    store, _, labels, split = cohort
    cfg = MILTrainConfig(epochs=5, lr=3e-3, device="cpu")
    runs = [cross_validate(load_bags(store.open("tiles"), labels, stream=s), load_split(split), "abmil",
                           train_config=cfg, folds=[0]) for s in (False, True)]
    np.testing.assert_allclose(runs[0].scores, runs[1].scores, rtol=1e-5)
    assert runs[0].tile_scores.keys() == runs[1].tile_scores.keys()


def test_repeated_cv_gives_one_accuracy_per_fold_and_repeat() -> None:
    from cytoretrieve.queries.mil.evaluate import repeated_cv
    from cytoretrieve.queries.mil.train import MILTrainConfig

    bags, _ = synthetic_bags(30, shift=8.0, seed=5)
    acc = repeated_cv(bags, MILTrainConfig(epochs=20, lr=3e-3, device="cpu"), folds=3, repeats=2)
    assert acc.shape == (6,) and acc.mean() > 0.8


def test_labels_naming_slides_without_tiles_are_listed(cohort, tmp_path: Path) -> None:
    store, _, labels, _ = cohort
    extra = tmp_path / "more.csv"
    extra.write_text(Path(labels).read_text() + "ghost-1,positive,1\nghost-2,negative,0\n")
    with pytest.raises(CytoError, match=r"2 slide\(s\) without rows.*ghost-1, ghost-2"):
        load_bags(store.open("tiles"), extra)


def test_score_cli_end_to_end(cohort, tmp_path: Path) -> None:
    store, _, labels, split = cohort
    out = tmp_path / "out"
    for method in ("abmil", "retrieval"):
        code = run(["score", "--tiles", "tiles", "--labels", str(labels), "--split", str(split), "--store", store.uri,
                    "--method", method, "--epochs", "30", "--lr", "0.003", "--device", "cpu",
                    "--json", str(tmp_path / f"{method}.json"), "--out", str(out / method)])
        assert code == 0
        res = json.loads((tmp_path / f"{method}.json").read_text())
        assert len(res["folds"]) == 4 and sorted(res["slides"]) == sorted(read_labels(labels))
        assert set(res["mean"]) >= {"auc", "balanced_accuracy", "sensitivity", "specificity", "f1"}
        assert res["mean"]["auc"] > 0.8
        assert (out / method / "roc.png").read_bytes()[:4] == b"\x89PNG"
        top = json.loads((out / method / "top_tiles.json").read_text())
        assert set(top) == set(res["slides"]) and all(t["top_tiles"][0]["id"].startswith(s + "#") for s, t in top.items())


def test_score_cli_bad_inputs_exit_2_and_write_nothing(cohort, tmp_path: Path, capsys) -> None:
    store, bags, labels, split = cohort
    out = tmp_path / "never"
    base = ["score", "--tiles", "tiles", "--store", store.uri, "--out", str(out), "--epochs", "1"]
    # a split that does not cover the labelled slides
    small = write_group_labels(bags.subset(range(12)), tmp_path / "small.csv")
    sp, _ = make_split(read_labels(small), folds=3)
    write_split(sp, tmp_path / "small.json")
    assert run([*base, "--labels", str(labels), "--split", str(tmp_path / "small.json")]) == 2
    assert "does not cover 28 labelled slide(s)" in capsys.readouterr().err
    # labels naming slides without tiles
    ghost = tmp_path / "ghost.csv"
    ghost.write_text(Path(labels).read_text() + "ghost,positive,1\n")
    assert run([*base, "--labels", str(ghost), "--split", str(split)]) == 2
    assert "without rows" in capsys.readouterr().err
    # a table without vectors (a tile table)
    store.db.create_table("bare", data=[{"id": "a", "slide": "s"}])
    assert run([*base, "--tiles", "bare", "--labels", str(labels), "--split", str(split)]) == 2
    assert "holds no vectors" in capsys.readouterr().err
    assert run([*base, "--labels", str(labels), "--split", str(split), "--method", "median"]) == 2
    assert not out.exists()


def test_score_cli_positive_bag_augmentation_leaves_out_held_out_slides_cells(cohort, tmp_path: Path, capsys) -> None:
    store, bags, labels, split = cohort
    _, masks = synthetic_bags(42, shift=8.0, seed=3)  # the cohort's positive instances: its "annotated cells"
    tiles = store.open("tiles")
    cells = store.create_or_open("cells", tiles.meta["backbone"], {"name": "annotations", "kind": "cells"})
    rows, x = [], []
    for name, v, m in zip(bags.names[:40], bags.vectors, masks):
        for j in np.flatnonzero(m):
            rows.append({"id": f"{name}/cell{j}", "label": "HSIL", "binary": 1, "slide": name, "group": name})
            x.append(v[j])
    cells.add(cells.make_rows(rows, np.stack(x)))
    base = ["score", "--tiles", "tiles", "--labels", str(labels), "--split", str(split), "--store", store.uri,
            "--epochs", "20", "--lr", "0.003", "--device", "cpu"]
    out = tmp_path / "aug.json"
    assert run([*base, "--augment-positives", "0.5", "--positives", "cells", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["augment_positives"] == 0.5 and res["mean"]["auc"] > 0.8
    left_out = [n for n in res["notes"] if "annotated positive(s) of its validation / test slides left out" in n]
    assert len(left_out) == 4  # every fold holds out slides with annotated cells
    capsys.readouterr()
    assert run([*base, "--augment-positives", "0.5"]) == 2
    assert "needs --positives" in capsys.readouterr().err
    assert run([*base, "--positives", "cells"]) == 2  # positives without a method that uses them
    assert "--augment-positives" in capsys.readouterr().err
    assert run([*base, "--method", "retrieval", "--positives", "cells", "--augment-positives", "0.5"]) == 2
    assert "trains none" in capsys.readouterr().err


def test_score_cli_on_the_real_musk1_table(tmp_path: Path, capsys) -> None:
    """A real MIL benchmark stored as a table (one row per instance, slide = bag) scored from the CLI, as a tile
    table would be; its rows have no slide coordinates, so --out writes no heat maps and says so."""
    bags = read_npz(MIL / "npz" / "musk1.npz")
    store = Store(tmp_path / "store")
    bags_to_table(store, "musk1", bags)
    labels = write_group_labels(bags, tmp_path / "musk1.csv")
    split, _ = make_split(read_labels(labels), folds=5, seed=0)
    write_split(split, tmp_path / "split.json")
    out = tmp_path / "out"
    assert run(["score", "--tiles", "musk1", "--labels", str(labels), "--split", str(tmp_path / "split.json"),
                "--store", store.uri, "--method", "gated", "--epochs", "30", "--lr", "0.002", "--device", "cpu",
                "--json", str(tmp_path / "musk1.json"), "--out", str(out)]) == 0
    res = json.loads((tmp_path / "musk1.json").read_text())
    assert len(res["slides"]) == 92 and res["mean"]["auc"] > 0.75
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "heat maps need a tile table" in printed and not (out / "heatmaps").exists()
