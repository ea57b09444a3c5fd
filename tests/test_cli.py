"""The command line as a user meets it: fast help, one-line errors with exit 2, the tables listing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.store.tables import Store

HEAVY = ("torch", "timm", "lancedb", "sklearn", "faiss", "matplotlib")


def test_cli_import_loads_no_heavy_library() -> None:
    code = f"import sys, cytoretrieve.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["embed", "classify", "search", "tables", "demo", "datasets", "tile", "transfer", "score", "train", "export"]),
        (["transfer"], ["--support", "--target", "--k", "--json"]),
        (["embed"], ["--backbone", "--weights", "--table", "--store", "--batch-size", "--workers", "--device", "Resumable"]),
        (["classify"], ["--runs", "--train-fraction", "--k", "--vote", "--temperature", "--seed", "--json", "--plot"]),
        (["search"], ["--id", "--where", "--json", "-k"]),
        (["datasets", "download"], ["--to", "--sha256"]),
    ],
)
def test_help_teaches_every_option(command, expected, capsys) -> None:
    assert run([*command, "--help"]) == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out


def test_version(capsys) -> None:
    from cytoretrieve import __version__

    assert run(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_usage_error_exits_2(capsys) -> None:
    assert run(["classify", "--runs", "many"]) == 2
    assert "--runs" in capsys.readouterr().err


def test_tables_lists_rows_dim_backbone(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # wide enough for every column (at 80 the fingerprint is left out)
    store = Store(tmp_path / "s")
    assert run(["tables", "--store", store.uri]) == 0
    assert "no tables" in capsys.readouterr().out
    t = store.create_or_open("cells_resnet18", {"arch": "resnet18", "fingerprint": "9" * 64, "dim": 8}, {"name": "cells"})
    t.add(t.make_rows([{"id": f"r{i}"} for i in range(3)], np.ones((3, 8), np.float32)))
    assert run(["tables", "--store", store.uri]) == 0
    out = capsys.readouterr().out
    assert "cells_resnet18" in out and "resnet18" in out and "999999999999" in out
    row = next(line for line in out.splitlines() if "cells_resnet18" in line)
    assert " 3 " in row and " 8 " in row


def test_search_needs_image_or_id(tmp_path, capsys) -> None:
    store = Store(tmp_path / "s")
    store.create_or_open("t", {"arch": "resnet18", "fingerprint": "9" * 64, "dim": 8}, {"name": "cells"})
    assert run(["search", "--table", "t", "--store", store.uri]) == 2
    err = capsys.readouterr().err
    assert "give either a query image or --id" in err and len(err.strip().splitlines()) == 1


def test_score_defaults_are_the_training_config_defaults() -> None:
    """`score` keeps literal defaults (importing the training module would slow every --help); they must stay the
    ones `MILTrainConfig` documents and the benchmarks measured."""
    import inspect

    from cytoretrieve.cli.score import score
    from cytoretrieve.queries.mil.train import MILTrainConfig

    params, cfg = inspect.signature(score).parameters, MILTrainConfig()
    for name in ("epochs", "lr", "clip", "instance_negatives", "top_k", "augment_max", "seed"):
        assert params[name].default == getattr(cfg, name), name
