"""The README's dataframe lines (pandas, polars, duckdb over one table), run as written against a small store."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cytoretrieve.store.tables import Store
from helpers.paths import README

MARKER = "<!-- dataframes: tests/test_dataframes.py runs this block -->"


def readme_block() -> str:
    text = README.read_text()
    assert MARKER in text, "the README's dataframe section lost its marker"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    assert match, "no python block after the dataframe marker"
    return match.group(1)


def test_readme_dataframe_lines_open_the_same_table(tmp_path, monkeypatch) -> None:
    pytest.importorskip("pandas")
    pytest.importorskip("polars")
    pytest.importorskip("duckdb")
    code = readme_block()
    name = re.search(r'open_table\("([^"]+)"\)', code).group(1)
    store = Store(tmp_path / "indexes")
    table = store.create_or_open(name, {"arch": "resnet50", "fingerprint": "d" * 64, "dim": 8}, {"name": "herlev"})
    labels = ["NILM"] * 5 + ["HSIL"] * 3
    vectors = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    table.add(table.make_rows([{"id": f"c{i}", "label": lab} for i, lab in enumerate(labels)], vectors))
    monkeypatch.chdir(tmp_path)  # the block opens "indexes" in the current folder
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own lines, as written
    df, pf, counts = scope["df"], scope["pf"], scope["counts"]
    assert len(df) == len(pf) == 8 and set(df.columns) >= {"id", "label", "vector"}
    np.testing.assert_array_equal(np.stack(df["vector"].to_numpy()), vectors)
    np.testing.assert_array_equal(np.stack(pf["vector"].to_numpy()), vectors)
    assert dict(zip(counts["label"], counts["n"])) == {"NILM": 5, "HSIL": 3}
