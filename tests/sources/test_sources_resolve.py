"""One reading of a data argument for every command: `embed SOURCE`, `train --data` and `--paste-cells` resolve
a folder, a CSV manifest, a slide file and a table name by the same rules (`cytoretrieve.sources.resolve`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.resolve import not_a_table, resolve_source


def test_each_kind_by_one_rule(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cells").mkdir()
    (tmp_path / "list.csv").write_text("path,label\n")
    (tmp_path / "case.svs").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert resolve_source("cells").kind == "folder" and resolve_source("cells").path == tmp_path / "cells"
    assert resolve_source(tmp_path / "list.csv").kind == "manifest"
    assert resolve_source("case.svs").kind == "slide"
    assert resolve_source("herlev_tiles") == resolve_source("herlev_tiles")  # a name: a table of the store
    assert resolve_source("herlev_tiles").kind == "table" and resolve_source("herlev_tiles").value == "herlev_tiles"
    with pytest.raises(CytoError, match=r"^`data` not found: .*missing"):
        resolve_source("sub/missing", param="data")
    with pytest.raises(CytoError, match="not found"):
        resolve_source("missing.csv")  # a file ending: a path, not a table name
    with pytest.raises(CytoError, match="neither a CSV manifest nor a slide"):
        resolve_source("notes.txt")
    message = str(not_a_table("cmu", "/s", ["a_tiles", "b_tiles"], "data"))
    assert message.startswith("`data` 'cmu' not found") and "a_tiles, b_tiles" in message and "\n" not in message


def test_embed_and_train_read_an_argument_alike(tmp_path: Path) -> None:
    """A missing table name: both jobs give the resolver's message, naming their own parameter."""
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.store.tables import Store
    from cytoretrieve.train.data import open_sources

    store = Store(tmp_path / "store")
    with pytest.raises(CytoError, match="`source` 'no_table' not found: it is neither a folder, a CSV manifest"):
        embed("no_table", load_backbone("resnet18", "random", image_size=32), store)
    with pytest.raises(CytoError, match="`data` 'no_table' not found: it is neither a folder, a CSV manifest"):
        open_sources(["no_table"], store.uri)
    with pytest.raises(CytoError, match="`source` not found"):
        embed(tmp_path / "nope", load_backbone("resnet18", "random", image_size=32), store)
    with pytest.raises(CytoError, match="`data` not found"):
        open_sources([tmp_path / "nope"])
