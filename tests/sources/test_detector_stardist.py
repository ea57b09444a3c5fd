"""The `stardist` detector (the `stardist` extra, on TensorFlow): a user's StarDist 2D model folder, tried with a tiny
StarDist model (8 rays, a two-level U-Net of 8 filters) the test trains in seconds on synthetic discs and saves with
StarDist itself (no download): nuclei in input pixels with physical areas and StarDist's probabilities, the model's
pixel size honoured, grey and RGB fields, and one clear error for a missing, wrong or foreign model folder and for a
missing package (library and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.cli import run
from cytoretrieve.sources.slides.detectors import get_detector
from cytoretrieve.sources.slides.detectors.evaluate import match_points
from helpers.nucleus_discs import RADIUS_UM, disc_field

MODEL_MPP = 0.5  # um/px of the fields the tiny model is trained on
pytestmark = [  # Keras 3 under numpy 2 while the tiny model trains: noise, not a fault of the detector
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")]


def _train_tiny_stardist(basedir: Path, name: str) -> Path:
    """Train a tiny StarDist2D on four synthetic fields (five epochs of 20 steps) and return its folder, as
    `StarDist2D.train` leaves it: config.json, weights_best.h5, weights_last.h5."""
    import tensorflow as tf
    from stardist.models import Config2D, StarDist2D

    from cytoretrieve.sources.slides.detectors.stardist import PERCENTILES

    images, labels = [], []
    for seed in range(4):
        grey, lab, _ = disc_field(MODEL_MPP, seed)
        lo, hi = np.percentile(grey, PERCENTILES)
        images.append((grey.astype(np.float32) - lo) / (hi - lo))
        labels.append(lab)
    tf.keras.utils.set_random_seed(0)
    config = Config2D(n_rays=8, grid=(2, 2), n_channel_in=1, unet_n_depth=2, unet_n_filter_base=8,
                      train_patch_size=(64, 64), train_batch_size=4, train_learning_rate=0.003, train_reduce_lr=None,
                      train_tensorboard=False, use_gpu=False)
    model = StarDist2D(config, name=name, basedir=str(basedir))
    model.train(images, labels, validation_data=(images[:2], labels[:2]), epochs=5, steps_per_epoch=20)
    return basedir / name


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("stardist", reason="the stardist extra is not installed (pip install '.[stardist]')")
    pytest.importorskip("tensorflow", reason="the stardist extra is not installed (pip install '.[stardist]')")
    folder = tmp_path_factory.mktemp("stardist")
    out = {"tiny": _train_tiny_stardist(folder, "tiny")}
    for name in ("no_config", "not_stardist", "no_weights", "broken_weights"):
        (folder / name).mkdir()
        out[name] = folder / name
    (folder / "not_stardist" / "config.json").write_text(json.dumps({"arch": "resnet18"}))
    for name in ("no_weights", "broken_weights"):
        (folder / name / "config.json").write_text((out["tiny"] / "config.json").read_text())
    (folder / "broken_weights" / "weights_best.h5").write_bytes(b"not hdf5")
    out["zip"] = folder / "TF_SavedModel.zip"
    out["zip"].write_bytes(b"PK")
    return out


@pytest.mark.parametrize("mpp, rgb", [(MODEL_MPP, False), (0.25, True)])
def test_tiny_stardist_model_finds_the_nuclei(models: dict[str, Path], mpp: float, rgb: bool) -> None:
    det = get_detector("stardist", weights=models["tiny"] / "weights_best.h5", model_mpp=MODEL_MPP)  # a file in it
    assert det.name == "stardist" and det.settings["n_rays"] == 8 and det.settings["channels"] == 1
    assert det.settings["weights"] == str(models["tiny"]) and det.settings["weights_file"] == "weights_best.h5"
    grey, _, truth = disc_field(mpp, seed=7)  # a field the model was not trained on; at 0.25 um/px StarDist halves it
    found = det(np.repeat(grey[..., None], 3, axis=2) if rgb else grey, mpp)
    assert match_points(found.xy, truth, 1.0 / mpp) == (5, 0, 0)  # within 1 um
    np.testing.assert_allclose(found.area_um2, np.pi * RADIUS_UM**2, rtol=0.25)  # an 8-ray polygon of each disc
    assert np.all(found.darkness > 0.3)
    assert np.all((found.confidence >= det.settings["prob_thresh"]) & (found.confidence <= 1.0))
    assert np.isnan(found.cell_area_um2).all() and np.isnan(found.nc_ratio).all()
    assert found.labels is not None and found.labels.shape == grey.shape and found.labels.max() == 5


def test_without_a_model_pixel_size_the_image_is_used_as_it_is(models: dict[str, Path]) -> None:
    det = get_detector("stardist", weights=models["tiny"], min_area_um2=0.0)
    assert det.settings["model_mpp"] is None and det.settings["prob_thresh"] == 0.5  # StarDist's default
    grey, _, truth = disc_field(MODEL_MPP, seed=8)
    found = det(grey, 0.3)  # the discs are the model's size in pixels: found, areas from the mpp given
    assert match_points(found.xy, truth, 2.0) == (5, 0, 0)
    np.testing.assert_allclose(found.area_um2, np.pi * (RADIUS_UM / MODEL_MPP * 0.3) ** 2, rtol=0.25)
    assert len(get_detector("stardist", weights=models["tiny"], prob_thresh=0.999)(grey, 0.3)) == 0


def test_missing_wrong_or_foreign_model_is_one_clear_error(models: dict[str, Path], tmp_path: Path) -> None:
    cases = [({}, "--weights"), ({"weights": tmp_path / "none"}, "no model folder"),
             ({"weights": models["no_config"]}, "not a StarDist model folder"),
             ({"weights": models["not_stardist"]}, "not a StarDist config"),
             ({"weights": models["no_weights"]}, "holds no StarDist weights"),
             ({"weights": models["broken_weights"]}, "could not be loaded as a StarDist model"),
             ({"weights": models["zip"]}, "Fiji / QuPath export"),
             ({"weights": models["tiny"], "prob_thresh": 1.5}, "`prob_thresh` must be between 0 and 1")]
    for settings, words in cases:
        with pytest.raises(ValueError, match=words):
            get_detector("stardist", **settings)


def test_without_the_package_the_error_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"n_rays": 8, "n_dim": 2}))
    (tmp_path / "weights_best.h5").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "stardist.models", None)  # as if stardist were not installed
    with pytest.raises(ValueError, match=r"pip install 'cytoretrieve\[stardist\]'"):
        get_detector("stardist", weights=tmp_path)


def test_the_cli_and_the_registry_do_not_import_tensorflow() -> None:
    code = ("import sys, cytoretrieve.cli, cytoretrieve.sources.slides.detectors as d; "
            "assert 'stardist' in d.DETECTORS; print(sorted({'stardist', 'tensorflow'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_cells_with_a_stardist_model(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    field = tmp_path / "f1.png"
    Image.fromarray(disc_field(MODEL_MPP, seed=9)[0]).save(field)
    store = str(tmp_path / "store")
    assert run(["cells", str(field), "--mpp", str(MODEL_MPP), "--detector", "stardist", "--weights",
                str(models["tiny"]), "--store", store, "--table", "sd", "--no-focus"]) == 0
    from cytoretrieve.store.tables import Store
    from cytoretrieve.store.tiles import open_tile_table

    table = open_tile_table(Store(store), "sd")
    assert table.count() == 5 and table.meta["detector"]["name"] == "stardist"
    assert table.meta["detector"]["weights"] == str(models["tiny"])
    capsys.readouterr()
    for args, words in ((["--detector", "stardist"], "--weights"),
                        (["--detector", "stardist", "--weights", str(models["not_stardist"])], "not a StarDist")):
        assert run(["cells", str(field), "--mpp", "0.5", "--store", store, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
