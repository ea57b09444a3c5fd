"""What a new user meets first (issue 26): honest words (ties, `--where` columns, similarity percentiles), the
provenance `tables` shows (weights, kind, interrupted runs, internal tables hidden), the main commands whole at 80
columns, and a first line on stderr soon after a slow command starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.queries.knn import majority_label, tied_labels
from cytoretrieve.queries.search import Hit, SearchResult, percentile_of, search
from cytoretrieve.store.tables import Store
from cytoretrieve.views.hits import majority_words
from helpers.herlev_subset import TABLE, TILE_TABLE, add_tiles, herlev_store, link_subset

QUERY = "carcinoma_in_situ/149143370-149143378-001.jpg"
WIDTH = 80


@pytest.fixture(scope="module")
def store(tmp_path_factory, herlev_root) -> Store:  # noqa: ANN001
    s = herlev_store(herlev_root, tmp_path_factory.mktemp("first_hour"))
    add_tiles(s)
    return s


@pytest.fixture()
def narrow(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setenv("TERMINAL_WIDTH", str(WIDTH))


def _lines_fit(text: str) -> None:
    too_wide = [line for line in text.splitlines() if len(line.rstrip()) > WIDTH]
    assert too_wide == [], too_wide


# ------------------------------------------------------------------------------------------------ honest words


def test_a_three_way_tie_is_reported_as_a_tie() -> None:
    neighbours = [("LD", 0.9), ("MD", 0.8), ("SD", 0.7)]
    assert sorted(tied_labels(neighbours)) == ["LD", "MD", "SD"]
    assert tied_labels(neighbours)[0] == majority_label(neighbours)  # the tie rule's pick first, the vote unchanged
    hits = [Hit(f"h{i}", s, label, 1, None, None) for i, (label, s) in enumerate(neighbours)]
    tie = SearchResult("t", "q", hits, majority_label(neighbours), tied=tied_labels(neighbours))
    assert tie.is_tie and majority_words(tie).startswith("no majority: ") and "tied (1 each)" in majority_words(tie)
    lead = [("LD", 0.9), ("LD", 0.8), ("SD", 0.95)]
    assert tied_labels(lead) == ["LD"]
    hits = [Hit(f"h{i}", s, label, 1, None, None) for i, (label, s) in enumerate(lead)]
    assert majority_words(SearchResult("t", "q", hits, "LD", tied=["LD"])) == "majority LD (2 of 3)"


def test_cli_prints_a_tie_not_a_majority(store: Store, capsys, narrow) -> None:  # noqa: ANN001
    result = search(store.open(TABLE), row_id=QUERY, k=7)
    assert run(["search", "--id", QUERY, "--table", TABLE, "--store", store.uri, "-k", "7"]) == 0
    out = capsys.readouterr().out
    if result.is_tie:
        assert "no majority" in out and "majority label" not in out
    else:
        assert f"majority {result.majority_label}" in out


def test_where_errors_name_columns_not_flags(store: Store, capsys) -> None:  # noqa: ANN001
    assert run(["search", "--id", QUERY, "--table", TABLE, "--store", store.uri, "--where", "labl = 1"]) == 2
    err = capsys.readouterr().err
    assert "labl" in err and "`slide`" in err and "`tile_size`" in err and "`mpp`" in err
    assert "--slide" not in err and "--tile-size" not in err and "--id," not in err
    assert err.startswith("cytoretrieve: error: invalid --where filter")  # the parameter itself is still its flag


def test_similarity_percentile_is_computed_once_per_version_and_cached(store: Store) -> None:
    table = store.open(TABLE)
    result = search(table, row_id=QUERY, k=5)
    assert all(h.percentile is not None and 0 <= h.percentile <= 100 for h in result.hits)
    ranks = [h.percentile for h in result.hits]
    assert ranks == sorted(ranks, reverse=True)  # best hit, highest percentile
    cached = json.loads((store.index_dir() / f"{TABLE}.nnsim.json").read_text())
    assert cached["version"] == table.version and len(cached["percentiles"]) == 101
    scale = np.asarray(cached["percentiles"])
    assert percentile_of(scale, scale[0] - 1) == 0 and percentile_of(scale, scale[-1] + 1) == 100
    assert percentile_of(None, 0.5) is None
    import cytoretrieve.queries.search as module

    assert "nearest neighbour" in module.__doc__


# ------------------------------------------------------------------------------------------------ provenance


def test_tables_shows_weights_and_kind_and_hides_internal_tables(store: Store, capsys, narrow) -> None:  # noqa: ANN001
    assert run(["tables", "--store", store.uri]) == 0
    captured = capsys.readouterr()
    out = captured.out
    _lines_fit(out)
    for header in ("table", "rows", "kind", "backbone", "weights"):
        assert f" {header} " in out.splitlines()[2] + " "
    row = next(line for line in out.splitlines() if f" {TABLE} " in line)
    assert " cells " in row and " random " in row and " resnet18 " in row
    assert " tiles " in next(line for line in out.splitlines() if f" {TILE_TABLE} " in line)
    assert "slide_overviews" not in out and "--all" in captured.err
    assert run(["tables", "--store", store.uri, "--all"]) == 0
    assert "slide_overviews" in capsys.readouterr().out


def test_ctrl_c_marks_the_table_interrupted_until_a_run_finishes_it(herlev_root: Path, tmp_path: Path, capsys,
                                                                   narrow) -> None:  # noqa: ANN001
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone

    store = Store(tmp_path / "store")
    data = link_subset(herlev_root, tmp_path / "cells", 4)
    backbone = load_backbone("resnet18", "random", image_size=32)

    def stop(done: int, todo: int, failed: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    report = embed(data, backbone, store, batch_size=8, workers=0, commit_rows=8, on_progress=stop)
    assert report.interrupted and 0 < report.added < 28
    assert store.write_state(TABLE) == "interrupted"
    assert run(["tables", "--store", store.uri]) == 0
    captured = capsys.readouterr()
    assert "interrupted" in next(line for line in captured.out.splitlines() if TABLE in line)
    assert run(["classify", "--table", TABLE, "--store", store.uri, "--k", "50"]) == 2
    err = capsys.readouterr().err
    assert f"table '{TABLE}' is interrupted" in err and "rerun" in err
    finished = embed(data, backbone, store, batch_size=8, workers=0)
    assert not finished.interrupted and finished.added + report.added == 28
    assert store.write_state(TABLE) == ""


# ------------------------------------------------------------------------------------------------ 80 columns


def test_search_at_80_columns_keeps_ids_and_headers_whole(store: Store, capsys, narrow) -> None:  # noqa: ANN001
    assert run(["search", "--id", QUERY, "--table", TABLE, "--store", store.uri, "-k", "6"]) == 0
    out = capsys.readouterr().out
    _lines_fit(out)
    for header in ("#", "sim", "label", "id"):
        assert f" {header} " in out
    for h in search(store.open(TABLE), row_id=QUERY, k=6).hits:
        assert f" {h.id} " in out
    tiles = store.open(TILE_TABLE)
    query = tiles.read(["id"]).column("id")[3].as_py()
    assert run(["search", "--id", query, "--table", TILE_TABLE, "--store", store.uri, "-k", "5"]) == 0
    out = capsys.readouterr().out
    _lines_fit(out)
    for header in ("sim", "pct", "id", "x", "y"):
        assert f" {header} " in out
    for h in search(tiles, row_id=query, k=5).hits:
        assert f" {h.id} " in out


def test_tile_and_classify_and_embed_help_at_80_columns(store: Store, tmp_path: Path, capsys, narrow) -> None:  # noqa: ANN001
    from helpers.paths import SVS

    assert run(["tile", str(SVS), "--store", str(tmp_path / "s"), "--table", "t"]) == 0
    out = capsys.readouterr().out
    _lines_fit(out)
    for header in ("slide", "status", "tiles", "um/px"):
        assert f" {header} " in out
    assert f" {SVS.stem} " in out
    assert run(["classify", "--table", TABLE, "--store", store.uri, "--k", "1,3", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    _lines_fit(out)
    assert "weighted F1" in out and f" {TABLE}" in out
    assert run(["embed", "--help"]) == 0
    out = capsys.readouterr().out
    _lines_fit(out)
    helps = [line.split("│")[1][40:].strip() for line in out.splitlines() if line.startswith("│ --batch-size")]
    assert helps and helps[0].startswith("Images per forward pass")


def test_contact_sheet_title_says_what_was_searched(store: Store, tmp_path: Path) -> None:
    from cytoretrieve.queries.search import query_picture, thumbnails
    from cytoretrieve.views.contact_sheet import CELL, _caption_lines, render_contact_sheet

    tiles = store.open(TILE_TABLE)
    query = tiles.read(["id"]).column("id")[3].as_py()
    result = search(tiles, row_id=query, k=5)
    sheet = render_contact_sheet(result, thumbnails(tiles, [h.id for h in result.hits]), query_picture(tiles, row_id=query))
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    from cytoretrieve.views.hits import caption

    lines = [text for _, text in _caption_lines(draw, caption(result.hits[0], 1), font)]
    assert result.hits[0].slide in lines and f"at x {result.hits[0].x}, y {result.hits[0].y}" in lines
    assert all(draw.textlength(t, font=font) <= CELL for t in lines) and not any("…" in t for t in lines)


# ------------------------------------------------------------------------------------------------ a first line soon


@pytest.mark.parametrize("command", [["embed", "{data}", "--weights", "random", "--backbone", "resnet18"],
                                     ["classify", "--table", "nothing"]])
def test_a_slow_command_says_something_within_a_second(command: list[str], tmp_path: Path, herlev_root: Path) -> None:
    """A terminal (FORCE_COLOR makes rich treat the pipe as one) sees a status line long before the heavy
    libraries have loaded: within 1 s of the CLI's own start-up (measured here too, so a loaded machine does not
    fail it; alone the first line comes after ~0.3 s, the libraries after 3-8 s)."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import cytoretrieve.cli"], check=True)
    startup = time.monotonic() - start
    data = str(link_subset(herlev_root, tmp_path / "cells", 1)) if "{data}" in command else ""
    args = [a.replace("{data}", data) for a in command]
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "80"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "cytoretrieve", *args, "--store", str(tmp_path / "s")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        first = proc.stderr.read(1)
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    assert first and elapsed < startup + 1.0, (elapsed, startup)
