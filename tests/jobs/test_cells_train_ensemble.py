"""`cells train --ensemble N`: one model file holding N networks (consecutive seeds) that records its members,
seeds and training data, used by `cells --detector FILE` (whose table records them too); a bad ensemble size is
one usage error. Tiny drawn
fields and a few steps, so it runs in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.cli import run
from cytoretrieve.store.tables import Store
from cytoretrieve.store.tiles import open_tile_table

MPP = 0.5
NUCLEI = [(40, 40), (120, 50), (70, 130), (150, 150)]  # px


def _field(path: Path, shift: int) -> np.ndarray:
    """A pale sheet with four dark round nuclei (radius 7 px at 0.5 um/px); returns their points, x y."""
    yy, xx = np.mgrid[0:200, 0:200]
    grey = np.full((200, 200), 232.0)
    grey[15:185, 15:185] = 200.0
    pts = np.array(NUCLEI, dtype=float) + shift
    for x, y in pts:
        grey[np.hypot(xx - x, yy - y) <= 7] = 95.0
    grey += np.random.default_rng(shift).normal(0, 2.0, grey.shape)
    Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).save(path)
    return pts


def test_cells_train_ensemble_writes_one_file_with_its_members(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cytoretrieve.sources.slides.detectors import get_detector

    fields = tmp_path / "fields"
    fields.mkdir()
    rows = ["frame,x,y"]
    for i, name in enumerate(("a", "b")):
        rows += [f"{name},{x},{y}" for x, y in _field(fields / f"{name}.png", shift=3 * i)]
    points = tmp_path / "points.csv"
    points.write_text("\n".join(rows) + "\n")
    model = tmp_path / "ensemble.pt"
    args = ["cells", "train", "--points", str(points), "--images", str(fields), "--mpp", str(MPP), "--steps", "3"]
    assert run([*args, "--ensemble", "2", "--seed", "4", "--out", str(model)]) == 0

    detector = get_detector(model)
    assert len(detector.nets) == 2
    assert detector.settings["ensemble"] == 2 and detector.settings["seed"] == 4 and detector.settings["steps"] == 3
    assert [m["seed"] for m in detector.record["members"]] == [4, 5]
    assert detector.record["names"] == ["a.png", "b.png"] and detector.record["points"] == 2 * len(NUCLEI)
    assert 0 < detector.params.threshold < 1  # chosen on the training fields

    store = tmp_path / "store"
    assert run(["cells", str(fields / "a.png"), "--mpp", str(MPP), "--detector", str(model), "--store", str(store),
                "--table", "ens", "--no-focus"]) == 0
    meta = open_tile_table(Store(store), "ens").meta["detector"]
    assert meta["name"] == "points" and meta["ensemble"] == 2  # the table records the model's members
    assert [m["seed"] for m in meta["model"]["members"]] == [4, 5]

    assert run([*args, "--ensemble", "0", "--out", str(tmp_path / "bad.pt")]) == 2
    assert not (tmp_path / "bad.pt").exists()
