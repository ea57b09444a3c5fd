"""Cross-dataset transfer over stored vectors: exact metrics on constructed clusters, k selection, bad input, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.queries.transfer import select_k, transfer
from cytoretrieve.store.tables import Store

DIM = 8
FP = "a" * 64
OTHER_FP = "b" * 64
POS, NEG = np.eye(DIM)[0], np.eye(DIM)[1]  # positives cluster around e0, negatives around e1


def _cluster(centre: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    return (centre + noise * rng.standard_normal((n, DIM))).astype(np.float32)


def _add_table(store: Store, name: str, vectors: np.ndarray, binary: list, fingerprint: str = FP,
               dataset: str | None = None) -> None:
    table = store.create_or_open(name, {"arch": "resnet18", "fingerprint": fingerprint, "dim": DIM},
                                 {"name": dataset or name})
    records = [{"id": f"{name}/{i}", "label": {1: "P", 0: "N", None: "M"}[b], "binary": b}
               for i, b in enumerate(binary)]
    table.add(table.make_rows(records, vectors))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    rng = np.random.default_rng(0)
    st = Store(tmp_path_factory.mktemp("transfer") / "store")
    # support A: 20 positives near e0, 20 negatives near e1, 5 rows of neither (null binary) near e0
    _add_table(st, "herlev_r18", np.concatenate([_cluster(POS, 20, rng), _cluster(NEG, 20, rng), _cluster(POS, 5, rng)]),
               [1] * 20 + [0] * 20 + [None] * 5, dataset="herlev")
    _add_table(st, "sipakmed_r18", np.concatenate([_cluster(POS, 10, rng), _cluster(NEG, 15, rng)]),
               [1] * 10 + [0] * 15, dataset="sipakmed")
    # mixed target: 4 positives near e0 (found), 1 near e1 (missed), 3 negatives near e1, 1 near e0 (false alarm),
    # and 2 unlabelled rows
    _add_table(st, "mixed_r18", np.concatenate([_cluster(POS, 4, rng), _cluster(NEG, 1, rng), _cluster(NEG, 3, rng),
                                                _cluster(POS, 1, rng), _cluster(POS, 2, rng)]),
               [1] * 5 + [0] * 4 + [None] * 2, dataset="mixed")
    _add_table(st, "cric_r18", np.concatenate([_cluster(POS, 6, rng), _cluster(NEG, 2, rng)]), [1] * 8, dataset="cric")
    _add_table(st, "negatives_r18", _cluster(NEG, 5, rng), [0] * 5)
    _add_table(st, "unlabelled_r18", _cluster(NEG, 5, rng), [None] * 5)
    _add_table(st, "other_r18", _cluster(POS, 6, rng), [1] * 6, fingerprint=OTHER_FP)
    return st


def test_exact_sensitivity_specificity_on_constructed_target(store: Store) -> None:
    r = transfer([store.open("herlev_r18")], store.open("mixed_r18"), k=3)
    assert r.confusion == [[3, 1], [1, 4]]  # [[TN, FP], [FN, TP]]
    assert r.sensitivity == pytest.approx(4 / 5) and r.specificity == pytest.approx(3 / 4)
    assert r.f1 == pytest.approx(8 / 10) and r.balanced_accuracy == pytest.approx((0.8 + 0.75) / 2)
    assert (r.n_target, r.n_target_positive, r.n_target_unlabelled) == (9, 5, 2)
    assert (r.n_support, r.n_support_positive, r.n_support_unlabelled) == (40, 20, 5)
    assert not r.k_selected and r.k == 3 and not r.positives_only
    json.dumps(r.to_dict())


def test_positives_only_target_reports_sensitivity_alone(store: Store) -> None:
    r = transfer([store.open("herlev_r18"), store.open("sipakmed_r18")], store.open("cric_r18"))
    assert r.positives_only and r.sensitivity == pytest.approx(6 / 8)
    assert r.specificity is None and r.f1 is None and r.balanced_accuracy is None and r.confusion is None
    assert r.support == ["herlev_r18", "sipakmed_r18"] and (r.n_support, r.n_support_positive) == (65, 30)
    assert r.k_selected and r.k in r.ks and r.fingerprint == FP and r.arch == "resnet18"


def test_k_selection_by_cross_validated_weighted_f1() -> None:
    rng = np.random.default_rng(1)
    clean = np.concatenate([_cluster(POS, 30, rng), _cluster(NEG, 30, rng)])
    codes = np.array([1] * 30 + [0] * 30)
    k, ks, curve = select_k(clean, codes)
    assert k == 1 and curve[0] == pytest.approx(1.0)  # every k is perfect: ties go to the smallest k
    assert ks == list(range(1, 49)) and len(curve) == 48  # 1..50 cut to the smallest training fold (48)
    # label noise: 5 of each cluster carry the other label; one neighbour copies the noise, many outvote it
    noisy = codes.copy()
    noisy[:5], noisy[30:35] = 0, 1
    k, ks, curve = select_k(clean, noisy, range(1, 21))
    assert k > 1 and curve[k - 1] == max(curve) and curve[k - 1] > curve[0]
    with pytest.raises(CytoError, match="exceeds the smallest training fold"):
        select_k(clean, codes, [60])
    with pytest.raises(CytoError, match="at least 5 of each"):
        select_k(clean[:34], codes[:34])


def test_mixed_fingerprints_name_every_table(store: Store) -> None:
    with pytest.raises(CytoError) as err:
        transfer([store.open("herlev_r18")], store.open("other_r18"))
    message = str(err.value)
    assert "\n" not in message
    assert f"herlev_r18 (resnet18 {FP[:12]})" in message and f"other_r18 (resnet18 {OTHER_FP[:12]})" in message


def test_targets_without_positives_or_labels_are_errors(store: Store) -> None:
    with pytest.raises(CytoError, match="no positives"):
        transfer([store.open("herlev_r18")], store.open("negatives_r18"), k=3)
    with pytest.raises(CytoError, match="no binary labels"):
        transfer([store.open("herlev_r18")], store.open("unlabelled_r18"), k=3)
    with pytest.raises(CytoError, match="both support and target"):
        transfer([store.open("herlev_r18")], store.open("herlev_r18"), k=3)
    with pytest.raises(CytoError, match="no positive vectors"):
        transfer([store.open("negatives_r18")], store.open("cric_r18"), k=1)
    with pytest.raises(CytoError, match="out of range"):
        transfer([store.open("sipakmed_r18")], store.open("cric_r18"), k=26)


@pytest.mark.parametrize("columns", ["200", "80"])
def test_cli_prints_one_column_per_support_and_json(store: Store, tmp_path, capsys, monkeypatch,
                                                     columns: str) -> None:
    monkeypatch.setenv("COLUMNS", columns)  # 80: too narrow for three support columns, so one row per support
    out_json = tmp_path / "t3.json"
    code = run(["transfer", "--store", store.uri, "--support", "herlev_r18", "--support", "sipakmed_r18",
                "--support", "herlev_r18,sipakmed_r18", "--target", "mixed_r18", "--k", "3", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0
    for word in ("herlev", "sipakmed", "herlev+sipakmed", f"resnet18 {FP[:12]}", "sensitivity", "specificity",
                 "TN 3 FP 1 FN 1 TP 4"):
        assert word in out
    assert ("balanced accuracy" if columns == "200" else "bal. acc.") in out
    table = [line for line in out.splitlines() if ": support" not in line and "left out" not in line]
    assert max(len(line) for line in table) <= int(columns) and "…" not in out  # the table fits, nothing cut
    data = json.loads(out_json.read_text())
    assert [r["column"] for r in data["results"]] == ["herlev", "sipakmed", "herlev+sipakmed"]
    api = transfer([store.open("herlev_r18")], store.open("mixed_r18"), k=3).to_dict()
    assert data["results"][0] == {"column": "herlev", **api}
    assert data["backbone"]["fingerprint"] == FP


@pytest.mark.parametrize(
    "args, words",
    [
        (["--support", "herlev_r18", "--target", "other_r18"], ["other_r18", OTHER_FP[:12], FP[:12]]),
        (["--support", "herlev_r18", "--target", "negatives_r18"], ["no positives"]),
        (["--support", "herlev_r18", "--target", "unlabelled_r18"], ["no binary labels"]),
        (["--support", "nosuch", "--target", "cric_r18"], ["no table 'nosuch'"]),
        (["--support", "herlev_r18,", "--target", "cric_r18"], ["empty table name"]),
        (["--support", "herlev_r18", "--target", "cric_r18", "--k", "0"], ["--k must be >= 1"]),
        (["--support", "herlev_r18", "--target", "cric_r18", "--vote", "loud"], ["unknown vote"]),
        (["--support", "herlev_r18", "--target", "cric_r18", "--ks", "x"], ["bad k spec"]),
    ],
)
def test_cli_bad_input_one_line_exit_2(store: Store, tmp_path, capsys, args, words) -> None:
    out_json = tmp_path / "never.json"
    assert run(["transfer", "--store", store.uri, *args, "--json", str(out_json)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cytoretrieve: error:")
    for word in words:
        assert word in err
    assert not out_json.exists()


def test_cli_help(capsys) -> None:
    assert run(["transfer", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("--support", "--target", "--k", "--vote", "--json", "--store", "Table 3"):
        assert word in out
