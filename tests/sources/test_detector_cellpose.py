"""The `cellpose` detector (the `cellpose` extra): a user's Cellpose 3 model file, tried with a tiny Cellpose network
the test fits in seconds on synthetic discs and saves in Cellpose's own format (a CPnet state dict; no download):
nuclei in input pixels with physical areas, the diameter set in um, grey and RGB fields, and one clear error for a
missing, wrong or foreign model file and for a missing package (library and CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.cli import run
from cytoretrieve.sources.slides.detectors import get_detector
from cytoretrieve.sources.slides.detectors.cellpose import DEFAULT_DIAMETER_UM
from cytoretrieve.sources.slides.detectors.evaluate import match_points
from helpers.nucleus_discs import RADIUS_UM
from helpers.nucleus_discs import disc_field as _field

MODEL_MPP = 0.5  # um/px of the fields the tiny model is fitted on: the discs' 12 px diameter is its diam_mean
SEED, STEPS, LR = 0, 150, 0.01  # the tiny model's fit
WIDTHS = [8, 16]  # Cellpose's own models use [32, 64, 128, 256]


def _fit_tiny_cellpose(path: Path) -> None:
    """Fit a two-level CPnet to Cellpose's own training targets (flows to each disc's centre, cell probability) on
    two synthetic fields and save it the way Cellpose saves models (`torch.save(net.state_dict())`). A fit that
    collapses to "all background" (about one seed in eight) is retried with the next seed."""
    import torch
    from cellpose import dynamics, transforms
    from cellpose.resnet_torch import CPnet

    xs, ys = [], []
    for seed in (0, 1):
        grey, labels, _ = _field(MODEL_MPP, seed)
        xs.append(transforms.normalize_img(np.stack([grey, 0 * grey], -1).astype(np.float32)).transpose(2, 0, 1))
        ys.append(dynamics.labels_to_flows([labels])[0])  # labels, foreground, flow y, flow x
    x, y = torch.tensor(np.array(xs)), torch.tensor(np.array(ys), dtype=torch.float32)
    inside = y[:, 1] > 0.5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in range(SEED, SEED + 3):
            torch.manual_seed(seed)
            net = CPnet([2, *WIDTHS], 3, sz=3, mkldnn=False, max_pool=True, diam_mean=2 * RADIUS_UM / MODEL_MPP)
            opt = torch.optim.Adam(net.parameters(), lr=LR)
            positive = torch.tensor(4.0)  # discs cover a tenth of a field: weigh them up, or all-background wins
            net.train()
            for _ in range(STEPS):
                out = net(x)[0]
                loss = (torch.nn.functional.mse_loss(out[:, :2], 5 * y[:, 2:]) / 2
                        + torch.nn.functional.binary_cross_entropy_with_logits(out[:, 2], inside.float(),
                                                                               pos_weight=positive))
                opt.zero_grad()
                loss.backward()
                opt.step()
            for m in net.modules():  # batch-norm statistics of the fitted network, as `eval()` will use them
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None
            with torch.no_grad():
                net(x)
                net.eval()
                fg = net(x)[0][:, 2] > 0
            if (fg & inside).sum() > 0.9 * inside.sum() and (fg & ~inside).sum() < 0.02 * (~inside).sum():
                torch.save(net.state_dict(), path)
                return
        raise AssertionError(f"the tiny Cellpose model did not fit with seeds {SEED}..{SEED + 2}")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("cellpose", reason="the cellpose extra is not installed (pip install '.[cellpose]')")
    import torch

    folder = tmp_path_factory.mktemp("cellpose")
    out = {name: folder / name for name in ("tiny_cellpose", "dict.pt", "sam_like.pt", "narrow.pt", "text.txt")}
    _fit_tiny_cellpose(out["tiny_cellpose"])  # Cellpose's model files have no extension
    torch.save({"not": torch.zeros(1)}, out["dict.pt"])
    torch.save({"encoder.patch_embed.proj.weight": torch.zeros(4, 3, 8, 8)}, out["sam_like.pt"])
    state = torch.load(out["tiny_cellpose"], weights_only=True)
    state["output.2.weight"] = state["output.2.weight"][:, :4]  # a CPnet state dict with one weight of a wrong shape
    torch.save(state, out["narrow.pt"])
    out["text.txt"].write_text("not a model\n")
    return out


@pytest.mark.parametrize("mpp, rgb", [(MODEL_MPP, False), (0.25, True)])
def test_tiny_cellpose_model_finds_the_nuclei(models: dict[str, Path], mpp: float, rgb: bool) -> None:
    det = get_detector("cellpose", weights=models["tiny_cellpose"], diameter_um=2 * RADIUS_UM)
    assert det.name == "cellpose" and det.settings["widths"] == WIDTHS and det.settings["diam_mean_px"] == 12.0
    assert len(det.settings["sha256_16"]) == 16 and det.settings["weights"].endswith("tiny_cellpose")
    grey, _, truth = _field(mpp, seed=7)  # a field the model was not fitted on; at 0.25 um/px Cellpose halves it
    found = det(np.repeat(grey[..., None], 3, axis=2) if rgb else grey, mpp)
    assert match_points(found.xy, truth, 1.0 / mpp) == (5, 0, 0)  # within 1 um
    np.testing.assert_allclose(found.area_um2, np.pi * RADIUS_UM**2, rtol=0.2)
    assert np.all(found.darkness > 0.3)
    assert np.all((found.confidence > 0.5) & (found.confidence <= 1.0))
    assert np.isnan(found.cell_area_um2).all() and np.isnan(found.nc_ratio).all()  # nucleus masks only
    assert found.labels is not None and found.labels.shape == grey.shape and found.labels.max() == 5
    assert found.labels_mpp == mpp


def test_diameter_in_um_from_the_settings_or_the_model(models: dict[str, Path]) -> None:
    assert get_detector("cellpose", weights=models["tiny_cellpose"]).settings["diameter_um"] == DEFAULT_DIAMETER_UM
    # the model's mean training diameter (12 px) at the pixel size it was trained at
    det = get_detector("cellpose", weights=models["tiny_cellpose"], model_mpp=MODEL_MPP)
    assert det.settings["diameter_um"] == pytest.approx(2 * RADIUS_UM)
    grey, _, truth = _field(0.4, seed=8)
    assert match_points(det(grey, 0.4).xy, truth, 2.5) == (5, 0, 0)
    big = get_detector("cellpose", weights=models["tiny_cellpose"], diameter_um=6.0, min_area_um2=40.0)
    assert len(big(grey, 0.4)) == 0  # every disc (28 um^2) is under the area limit


def test_missing_wrong_or_foreign_model_is_one_clear_error(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--weights"):
        get_detector("cellpose")
    with pytest.raises(ValueError, match="no model file"):
        get_detector("cellpose", weights=tmp_path / "none")
    for name in ("dict.pt", "text.txt"):
        with pytest.raises(ValueError, match="is not a Cellpose model file"):
            get_detector("cellpose", weights=models[name])
    with pytest.raises(ValueError, match="Cellpose-SAM"):
        get_detector("cellpose", weights=models["sam_like.pt"])
    with pytest.raises(ValueError, match=r"does not fit a Cellpose network of widths \[8, 16\]"):
        get_detector("cellpose", weights=models["narrow.pt"])
    with pytest.raises(ValueError, match="`diameter_um` must be a positive"):
        get_detector("cellpose", weights=models["tiny_cellpose"], diameter_um=-3)
    with pytest.raises(ValueError, match="image must be"):
        get_detector("cellpose", weights=models["tiny_cellpose"])(np.zeros((4, 4, 2), np.uint8), 0.5)


def test_without_the_package_the_error_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "cellpose.models", None)  # as if cellpose were not installed
    with pytest.raises(ValueError, match=r"pip install 'cytoretrieve\[cellpose\]'"):
        get_detector("cellpose", weights=model)


def test_the_cli_and_the_registry_do_not_import_cellpose() -> None:
    code = ("import sys, cytoretrieve.cli, cytoretrieve.sources.slides.detectors as d; "
            "assert 'cellpose' in d.DETECTORS; print('cellpose' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_cells_with_a_cellpose_model(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    field = tmp_path / "f1.png"
    Image.fromarray(_field(MODEL_MPP, seed=9)[0]).save(field)
    store = str(tmp_path / "store")
    mpp = DEFAULT_DIAMETER_UM / (2 * RADIUS_UM / MODEL_MPP)  # said to be coarser: the discs span the default 8 um
    assert run(["cells", str(field), "--mpp", str(mpp), "--detector", "cellpose", "--weights",
                str(models["tiny_cellpose"]), "--store", store, "--table", "cp", "--no-focus"]) == 0
    from cytoretrieve.store.tables import Store
    from cytoretrieve.store.tiles import open_tile_table

    table = open_tile_table(Store(store), "cp")
    assert table.meta["detector"]["name"] == "cellpose"
    assert table.meta["detector"]["weights"].endswith("tiny_cellpose")
    assert table.count() == 5
    capsys.readouterr()
    for args, words in ((["--detector", "cellpose"], "--weights"),
                        (["--detector", "cellpose", "--weights", str(models["dict.pt"])], "not a Cellpose model")):
        assert run(["cells", str(field), "--mpp", "0.5", "--store", store, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
