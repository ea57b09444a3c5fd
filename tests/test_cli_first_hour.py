"""What a new user meets first (issue 26): honest words (ties, `--where` columns, similarity percentiles), the
provenance `tables` shows (weights, kind, interrupted runs, internal tables hidden), the main commands whole at 80
columns, and a first line on stderr soon after a slow command starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.queries.knn import majority_label, tied_labels
from cytoretrieve.queries.search import Hit, SearchResult, percentile_of, search
from cytoretrieve.store.index import table_index
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
    index = table_index(table)
    assert cached["version"] == index.scale_version == f"faiss-{index.build}" and len(cached["percentiles"]) == 101
    scale = np.asarray(cached["percentiles"])
    assert percentile_of(scale, scale[0] - 1) == 0 and percentile_of(scale, scale[-1] + 1) == 100
    assert percentile_of(None, 0.5) is None
    import cytoretrieve.queries.search as module

    assert "nearest neighbour" in module.__doc__


def test_similarity_scale_survives_a_small_append_and_follows_a_rebuild(store: Store, tmp_path: Path) -> None:
    """Appended rows wait in the side index: the scale stays keyed to the main index's build (no thousands of
    queries at the first search after an append); a rebuild of the main index makes a new scale."""
    store = Store(str(shutil.copytree(store.uri, tmp_path / "store")))  # the module's store stays as it was
    table = store.open(TABLE)
    search(table, row_id=QUERY, k=5)
    path = store.index_dir() / f"{TABLE}.nnsim.json"
    before = json.loads(path.read_text())
    vector = table.row_by_id(QUERY, ["vector"])["vector"]
    table.add(table.make_rows([{"id": "appended/one.bmp", "path": "/x/one.bmp", "label": "normal_superficiel"}],
                              np.asarray([vector], np.float32)))
    table = store.open(TABLE)
    search(table, row_id=QUERY, k=5)
    index = table_index(table)
    assert index.side is not None and index.side.ntotal == 1  # the appended row, beside the main index
    assert json.loads(path.read_text()) == before
    rebuilt = table_index(table, rebuild=True)
    search(table, row_id=QUERY, k=5)
    assert json.loads(path.read_text())["version"] == rebuilt.scale_version != before["version"]


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


def _tables_in_subprocess(store: str) -> tuple[str, bool]:
    """`cytoretrieve tables` in a fresh interpreter at 80 columns: (its output, whether it imported lancedb)."""
    code = ("import sys; from cytoretrieve.cli import run; code = run(['tables', '--store', sys.argv[1]]); "
            "print('LANCEDB', 'lancedb' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, store], capture_output=True, text=True, check=True,
                          env={**os.environ, "COLUMNS": str(WIDTH)})
    out, _, flag = done.stdout.rpartition("LANCEDB ")
    return out, flag.strip() == "True"


def _row(out: str, table: str) -> list[str]:
    return next(line for line in out.splitlines() if f" {table} " in line).split()


def test_tables_answers_from_summaries_without_lancedb_and_never_from_a_stale_one(herlev_root: Path,
                                                                                   tmp_path: Path) -> None:
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.store.summary import FOLDER, describe_local

    store = Store(tmp_path / "store")
    data = link_subset(herlev_root, tmp_path / "cells", 2)
    embed(data, load_backbone("resnet18", "random", image_size=32), store, batch_size=8, workers=0)
    assert describe_local(store.uri)[1] == []  # the job's finish left an up-to-date summary
    out, imported = _tables_in_subprocess(store.uri)
    assert not imported and _row(out, TABLE)[:3] == [TABLE, "14", "cells"]
    _lines_fit(out)

    summary = tmp_path / "store" / FOLDER / f"{TABLE}.json"
    saved = json.loads(summary.read_text())
    saved["info"]["rows"] = 999  # a summary is read as it is while it names the table's newest version ...
    summary.write_text(json.dumps(saved))
    assert _row(_tables_in_subprocess(store.uri)[0], TABLE)[1] == "999"
    table = store.open(TABLE)
    table.tbl.delete(f"id = '{table.read(['id']).column('id')[0].as_py()}'")  # ... and not after a commit
    out, imported = _tables_in_subprocess(store.uri)
    assert imported and _row(out, TABLE)[1] == "13"
    assert json.loads(summary.read_text())["info"]["rows"] == 13  # rewritten: the next one is fast again
    summary.write_text("{not json")
    assert _row(_tables_in_subprocess(store.uri)[0], TABLE)[1] == "13"
    summary.unlink()
    assert _row(_tables_in_subprocess(store.uri)[0], TABLE)[1] == "13"


def test_a_summary_is_keyed_by_the_newest_manifest_in_either_naming(tmp_path: Path) -> None:
    from cytoretrieve.store.summary import TableInfo, read_summary, version_key, write_summary

    versions = tmp_path / "t.lance" / "_versions"
    versions.mkdir(parents=True)
    for name in ("1.manifest", "2.manifest", "_latest.manifest", "latest_version_hint.json"):
        (versions / name).write_text(name)
    assert version_key(tmp_path, "t")["version"] == 2
    for v in (3, 4):  # Lance's newer naming: u64::MAX - version, zero-padded, so the newest sorts first
        (versions / f"{2**64 - 1 - v:020d}.manifest").write_text(str(v))
    key = version_key(tmp_path, "t")
    assert key["version"] == 4 and key["manifest"] == f"{2**64 - 5:020d}.manifest"
    info = TableInfo("t", 5, 8, "resnet18", "f" * 64, "d", 100, state="writing (pid 1 on h)")
    write_summary(tmp_path, info, key)
    assert read_summary(tmp_path, "t") == TableInfo("t", 5, 8, "resnet18", "f" * 64, "d", 100)  # no state kept
    (versions / f"{2**64 - 1 - 5:020d}.manifest").write_text("5")  # a commit: the summary no longer answers
    assert read_summary(tmp_path, "t") is None and version_key(tmp_path, "missing") is None


def test_tables_shows_the_stain_normaliser_only_when_a_table_has_one(store: Store, tmp_path: Path, capsys,
                                                                     narrow) -> None:  # noqa: ANN001
    import shutil

    from cytoretrieve.store.summary import FOLDER, describe_local, local_table_names
    from cytoretrieve.store.tables import stain_normaliser

    assert stain_normaliser({"backbone": {"preprocessing": {"stain": {"method": "macenko", "target": [1.0]}}}}) == \
        "macenko"
    assert stain_normaliser({"backbone": {"preprocessing": {"stain": "reinhard"}}}) == "reinhard"
    assert stain_normaliser({"stain": "macenko", "backbone": {}}) == "macenko"
    assert stain_normaliser({"backbone": {"preprocessing": {"stain": "none"}}}) == ""
    assert stain_normaliser({"backbone": "odd", "stain": None}) == ""
    assert run(["tables", "--store", store.uri]) == 0
    assert "normaliser" not in capsys.readouterr().out
    assert local_table_names(Path(store.uri)) == store.table_names()  # the folders LanceDB lists as tables
    copy = Path(shutil.copytree(store.uri, tmp_path / "copy"))
    assert TABLE in describe_local(str(copy))[1]  # a copied manifest is another file: its summary is not trusted
    assert run(["tables", "--store", str(copy)]) == 0  # ... until `tables` has read the copy through LanceDB
    capsys.readouterr()
    assert describe_local(str(copy))[1] == []
    summary = copy / FOLDER / f"{TABLE}.json"
    saved = json.loads(summary.read_text())
    saved["info"]["normaliser"] = "macenko"
    summary.write_text(json.dumps(saved))
    assert run(["tables", "--store", str(copy)]) == 0
    out = capsys.readouterr().out
    _lines_fit(out)
    assert any(" rows " in line and " normaliser " in line + " " for line in out.splitlines())
    assert " macenko " in next(line for line in out.splitlines() if f" {TABLE} " in line)
    assert " none " in next(line for line in out.splitlines() if f" {TILE_TABLE} " in line)


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


def test_thumbnails_are_stored_large_enough_to_judge_and_old_small_ones_still_show(store: Store) -> None:
    import io

    from PIL import Image

    from cytoretrieve.models.preprocess import THUMBNAIL_SIZE
    from cytoretrieve.queries.search import thumbnails
    from cytoretrieve.views.contact_sheet import CELL, _picture

    assert 192 <= THUMBNAIL_SIZE <= 256
    for name in (TABLE, TILE_TABLE):  # cells framed from their source (a 64 px model input), tiles alike
        stored = store.open(name).read(["thumbnail"]).column("thumbnail")[0].as_py()
        with Image.open(io.BytesIO(stored)) as im:
            assert im.format == "JPEG" and im.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    assert thumbnails(store.open(TABLE), [QUERY])[QUERY][:2] == b"\xff\xd8"
    old = io.BytesIO()  # a table made before: 96 px thumbnails fill the contact sheet's picture all the same
    Image.new("RGB", (96, 96), (200, 30, 30)).save(old, format="JPEG")
    for jpeg in (old.getvalue(), stored):
        picture = np.asarray(_picture(jpeg))
        assert picture.shape == (CELL, CELL, 3) and not (picture == 230).all(axis=2).any()  # no grey left over


# ------------------------------------------------------------------------------------------------ a first line soon


@pytest.mark.parametrize("command", [["embed", "{data}", "--weights", "random", "--backbone", "resnet18"],
                                     ["classify", "--table", "nothing"],
                                     ["search", "{image}", "--table", "nothing"],
                                     ["transfer", "--support", "nothing", "--target", "nothing"],
                                     ["score", "--tiles", "nothing", "--labels", "l.csv", "--split", "s.json"],
                                     ["tile", "{slide}"],
                                     ["cells", "{image}", "--mpp", "0.25"]],
                         ids=lambda c: c[0])
def test_a_slow_command_says_something_within_a_second(command: list[str], tmp_path: Path, herlev_root: Path) -> None:
    """A terminal (FORCE_COLOR makes rich treat the pipe as one) sees a status line long before the heavy
    libraries have loaded: within 1 s of the CLI's own start-up (measured here too, so a loaded machine does not
    fail it; alone the first line comes after ~0.3 s, the libraries after 3-8 s)."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import cytoretrieve.cli"], check=True)
    startup = time.monotonic() - start
    from helpers.paths import SVS

    data = str(link_subset(herlev_root, tmp_path / "cells", 1)) if "{data}" in command else ""
    image = str(herlev_root / QUERY)
    args = [a.replace("{data}", data).replace("{image}", image).replace("{slide}", str(SVS)) for a in command]
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
