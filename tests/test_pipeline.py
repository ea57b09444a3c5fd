"""End to end on real Herlev cells: embed (resumable, idempotent), classify from the store, search by id and image.

resnet18 with seeded random weights at 64 px keeps this fast on a CPU; the numbers are not the paper's, the
pipeline is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.jobs.embed import embed
from cytoretrieve.models.backbones import load_backbone
from cytoretrieve.queries.knn import classify_table
from cytoretrieve.queries.search import search
from cytoretrieve.store.tables import Store

HERLEV_CODES = ["NS", "NI", "NC", "LD", "MD", "SD", "CIS"]
EMBED_ARGS = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--batch-size", "32"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("resnet18", "random", image_size=64)


@pytest.fixture(scope="module")
def herlev_store(tmp_path_factory, herlev_root, backbone) -> Store:
    store = Store(tmp_path_factory.mktemp("store"))
    report = embed(herlev_root, backbone, store, batch_size=64, workers=1)
    assert report.added == 917 and not report.failed and report.table == "herlev_resnet18"
    return store


def test_embed_all_then_rerun_adds_nothing(herlev_store: Store, herlev_root: Path, backbone) -> None:
    table = herlev_store.open("herlev_resnet18")
    assert table.count() == 917
    version = table.version
    again = embed(herlev_root, backbone, herlev_store, workers=0)
    assert again.added == 0 and again.skipped == 917
    assert herlev_store.open("herlev_resnet18").version == version  # untouched: cached indexes stay valid
    meta = table.meta
    assert meta["backbone"]["fingerprint"] == backbone.fingerprint
    assert meta["dataset"]["labels"]["classes"] == HERLEV_CODES
    labels = Counter(table.read(["label"]).column("label").to_pylist())
    assert labels == {"NS": 74, "NI": 70, "NC": 98, "LD": 182, "MD": 146, "SD": 197, "CIS": 150}
    binary = Counter(table.read(["binary"]).column("binary").to_pylist())
    assert binary == {1: 182 + 146 + 197 + 150, 0: 74 + 70 + 98}
    thumb = table.read(["thumbnail"]).column("thumbnail")[0].as_py()
    assert thumb[:2] == b"\xff\xd8"  # a JPEG


def test_classify_reports_herlev_classes(herlev_store: Store) -> None:
    result = classify_table(herlev_store.open("herlev_resnet18"), runs=2, ks=range(1, 21))
    assert result.classes == HERLEV_CODES
    assert set(result.class_f1_mean) == set(HERLEV_CODES)
    assert 1 <= result.k_best <= 20
    assert result.n_train + result.n_test == 917
    # random features still carry colour and size: better than the 0.2 weighted F1 of always saying SD
    assert result.weighted_f1_mean > 0.3
    assert result.pos_f1_mean is not None and result.neg_f1_mean is not None


def test_search_by_id_excludes_itself(herlev_store: Store) -> None:
    table = herlev_store.open("herlev_resnet18")
    query = "carcinoma_in_situ/149143370-149143378-001.jpg"
    result = search(table, row_id=query, k=5)
    assert len(result.hits) == 5 and query not in [h.id for h in result.hits]
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    assert result.majority_label in HERLEV_CODES
    only_normal = search(table, row_id=query, k=5, where="binary = 0")
    assert all(h.binary == 0 for h in only_normal.hits)


def test_search_by_image_finds_the_stored_copy(herlev_store: Store, herlev_root: Path) -> None:
    table = herlev_store.open("herlev_resnet18")
    image = herlev_root / "normal_columnar" / sorted(os.listdir(herlev_root / "normal_columnar"))[0]
    result = search(table, image=image, k=3, device="cpu")
    assert result.hits[0].id == f"normal_columnar/{image.name}"
    assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_classify_cli_json_and_plot(herlev_store: Store, tmp_path: Path, capsys) -> None:
    from cytoretrieve.cli import run

    out = tmp_path / "r.json"
    rc = run(["classify", "--table", "herlev_resnet18", "--store", herlev_store.uri, "--runs", "2",
              "--k", "1-10", "--vote", "weighted", "--json", str(out), "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    printed = capsys.readouterr().out
    for code in HERLEV_CODES:
        assert code in printed
    import json

    data = json.loads(out.read_text())["results"][0]
    assert data["table"] == "herlev_resnet18" and len(data["f1_curve_mean"]) == 10
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["classify", "--table", "nope"], "no table 'nope'"),
        (["classify", "--table", "herlev_resnet18", "--k", "1-1000"], "k"),
        (["search", "--table", "herlev_resnet18", "--id", "x", "--where", "label ==="], "invalid --where"),
        (["search", "--table", "herlev_resnet18", "--id", "no/such.jpg"], "no row with id"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(herlev_store: Store, capsys, args, message) -> None:
    from cytoretrieve.cli import run

    rc = run([*args, "--store", herlev_store.uri])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("cytoretrieve: error:") and len(err.splitlines()) == 1 and message in err


def test_other_backbone_refused_and_store_unchanged(herlev_store: Store, herlev_root: Path) -> None:
    before = herlev_store.open("herlev_resnet18").version
    other = load_backbone("resnet18", "random", image_size=72)
    with pytest.raises(CytoError, match="holds vectors of backbone"):
        embed(herlev_root, other, herlev_store, table="herlev_resnet18")
    assert herlev_store.open("herlev_resnet18").version == before


def test_corrupt_images_are_skipped_and_listed(tmp_path: Path, backbone) -> None:
    from PIL import Image

    root = tmp_path / "cells"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (100 + 40 * i, 80, 120)).save(root / cls / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    store = Store(tmp_path / "s")
    report = embed(root, backbone, store, workers=0)
    assert report.added == 6 and [i for i, _ in report.failed] == ["a/broken.png"]
    assert store.open(report.table).count() == 6


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cytoretrieve.cli import main; main()", *args]


def test_embed_killed_half_way_resumes_to_exactly_917(tmp_path: Path, herlev_root: Path) -> None:
    store = tmp_path / "s"
    cmd = _cli("embed", str(herlev_root), *EMBED_ARGS, "--store", str(store), "--workers", "1", "--commit-rows", "64")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    table = store / "herlev_resnet18.lance"
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if table.exists():
            try:
                rows = Store(store).open("herlev_resnet18").count()
            except Exception:  # noqa: BLE001 - the table may be mid-creation
                continue
            if rows >= 128:
                break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < rows < 917, "the job should have been killed half-way"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    t = Store(store).open("herlev_resnet18")
    ids = t.read(["id"]).column("id").to_pylist()
    assert len(ids) == 917 and len(set(ids)) == 917
    assert "already stored" in rerun.stdout


def test_embed_cli_bad_inputs(tmp_path: Path) -> None:
    missing = subprocess.run(_cli("embed", str(tmp_path / "nope"), *EMBED_ARGS, "--store", str(tmp_path / "s")),
                             capture_output=True, text=True)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    unknown = subprocess.run(_cli("embed", str(tmp_path), "--backbone", "resnet_nonexistent", "--weights", "random"),
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown backbone" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_vectors_match_a_direct_forward(herlev_store: Store, herlev_root: Path, backbone) -> None:
    """What the job stored is what the model computes for that image (no shuffling of rows and vectors)."""
    from PIL import Image

    from cytoretrieve.models.inference import embed_images

    table = herlev_store.open("herlev_resnet18")
    row = table.row_by_id("severe_dysplastic/" + sorted(os.listdir(herlev_root / "severe_dysplastic"))[3], ["path", "vector"])
    with Image.open(row["path"]) as im:
        direct = embed_images(backbone, [im.convert("RGB")], "cpu")[0]
    np.testing.assert_allclose(np.asarray(row["vector"]), direct, rtol=1e-3, atol=1e-4)


def test_transfer_cli_from_stored_herlev_to_stored_cric(herlev_store: Store, cric_root: Path, tmp_path: Path,
                                                        capsys) -> None:
    """The paper's transfer on real stored tables: CRIC (Bethesda folders, found without a label map) embedded by
    the CLI with the same seeded backbone, then k-NN fitted on Herlev's binary labels and scored on CRIC."""
    import json

    from cytoretrieve.cli import run

    assert run(["embed", str(cric_root), *EMBED_ARGS, "--store", herlev_store.uri]) == 0
    cric = herlev_store.open("cric_crops_100px_resnet18")
    assert cric.count() == 2121 and cric.fingerprint == herlev_store.open("herlev_resnet18").fingerprint
    out = tmp_path / "transfer.json"
    capsys.readouterr()
    assert run(["transfer", "--support", "herlev_resnet18", "--target", "cric_crops_100px_resnet18",
                "--store", herlev_store.uri, "--ks", "1,5,11", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "herlev_resnet18" in printed and "sensitivity" in printed.lower()
    res = json.loads(out.read_text())
    text = json.dumps(res)
    assert '"k"' in text and "specificity" in text and "balanced_accuracy" in text
    cm = [v for v in _find(res, "confusion") if isinstance(v, list)][0]
    assert sum(map(sum, cm)) == 2121 and cm[0][0] + cm[0][1] == 902  # CRIC: 902 NILM crops, 1219 abnormal


def _find(obj, key: str):  # noqa: ANN001, ANN202 - every value stored under a key containing `key`
    if isinstance(obj, dict):
        for k, v in obj.items():
            if key in k:
                yield v
            yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)
