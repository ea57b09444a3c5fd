"""A user's StarDist 2D model as a nucleus detector (`cells --detector stardist --weights MODEL_FOLDER`): the
`stardist` extra (StarDist on TensorFlow).

StarDist keeps a model in a folder: `config.json` (the network's settings: rays, grid, channels), the Keras weights
`weights_best.h5` (or `weights_last.h5`) and optionally `thresholds.json` (the probability and overlap thresholds
found by `optimize_thresholds`); `StarDist2D.train` and `StarDist2D(None, name, basedir)` write and read it. The
folder (or any file in it) is the `weights` setting; nothing is downloaded. StarDist and TensorFlow are imported only
when this detector is built.

- **pixel size**: a StarDist model sees objects at the pixel size it was trained at: with `model_mpp` the image is
  scaled by `mpp / model_mpp` (StarDist's own `scale`) and the labels come back at the image's size; without it
  the image is given as it is;
- **input**: grey fields repeated to the model's channels (3 for H&E-style models), RGB ones averaged to grey for
  a one-channel model; then normalised by the 1 and 99.8 percentiles of all its channels together (StarDist's
  `normalize(img, 1, 99.8, axis=(0, 1, 2))`, as its examples do);
- **output**: one nucleus per star-convex polygon: the centroid of its label, area (um^2), mean darkness, and as
  `confidence` StarDist's object probability. StarDist finds nuclei only: `cell_area_um2`, `nc_ratio` are NaN.

The Fiji / QuPath export of a model (`TF_SavedModel.zip`) is not read: give the Python model folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cytoretrieve.sources.slides.detectors import Nuclei, darkness
from cytoretrieve.sources.slides.detectors.torchscript import _digest, label_measures

PERCENTILES = (1.0, 99.8)
WEIGHT_FILES = ("weights_best.h5", "weights_last.h5", "weights_now.h5")  # the order StarDist (csbdeep) loads them
INSTALL = "pip install 'cytoretrieve[stardist]'"


def model_folder(weights: str | Path) -> tuple[Path, dict[str, Any], Path]:
    """(the model folder, its config, its weights file) for a StarDist 2D model folder or a file inside one."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise ValueError(f"no model folder {path} for the stardist detector")
    if path.suffix == ".zip":
        raise ValueError(f"{path} looks like a Fiji / QuPath export (TF SavedModel); the stardist detector reads "
                         "the Python model folder (config.json + weights_best.h5)")
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{folder} is not a StarDist model folder (no readable config.json)") from None
    if not isinstance(config, dict) or "n_rays" not in config:
        raise ValueError(f"{config_file} is not a StarDist config (no n_rays)")
    if config.get("n_dim", 2) != 2:
        raise ValueError(f"{folder} holds a {config.get('n_dim')}-D StarDist model; cells needs a 2-D one")
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise ValueError(f"{folder} holds no StarDist weights ({' or '.join(WEIGHT_FILES)})")
    return folder, config, found[0]


class StarDistSegmenter:
    """A StarDist 2D model folder (see the module docstring) as a detector."""

    name = "stardist"

    def __init__(self, weights: str | Path | None = None, model_mpp: float | None = None,
                 prob_thresh: float | None = None, nms_thresh: float | None = None, min_area_um2: float = 0.0,
                 name: str = "stardist") -> None:
        if weights is None or str(weights) == "":
            raise ValueError(f"the {name} detector needs the model: --weights FOLDER (a StarDist 2D model folder "
                             "with config.json and weights_best.h5; nothing is downloaded)")
        folder, config, weights_file = model_folder(weights)
        if model_mpp is not None and not (np.isfinite(model_mpp) and model_mpp > 0):
            raise ValueError(f"`model_mpp` must be a positive number, not {model_mpp}")
        for key, value in (("prob_thresh", prob_thresh), ("nms_thresh", nms_thresh)):
            if value is not None and not 0 < value < 1:
                raise ValueError(f"`{key}` must be between 0 and 1, not {value}")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notes, not its errors
        try:
            from stardist.models import StarDist2D
        except ImportError as e:
            raise ValueError(f"the {name} detector needs the stardist and tensorflow packages ({INSTALL}): {e}") from None
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # StarDist prints which weights and thresholds it loads
                self.model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
        except Exception as e:  # Keras / h5py / config errors, which vary by version
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{folder} could not be loaded as a StarDist model: {first[:200]}") from None
        self.channels = int(self.model.config.n_channel_in)
        self.model_mpp = model_mpp
        self.prob_thresh = float(prob_thresh if prob_thresh is not None else self.model.thresholds.prob)
        self.nms_thresh = float(nms_thresh if nms_thresh is not None else self.model.thresholds.nms)
        self.min_area_um2 = float(min_area_um2)
        self.name = name
        self.settings: dict[str, Any] = {
            "detector": name, "weights": str(folder.absolute()), "weights_file": weights_file.name,
            "sha256_16": _digest(weights_file), "model_mpp": model_mpp, "prob_thresh": self.prob_thresh,
            "nms_thresh": self.nms_thresh, "min_area_um2": self.min_area_um2, "n_rays": int(config["n_rays"]),
            "channels": self.channels, "normalise_percentiles": list(PERCENTILES), "stardist": _version("stardist"),
            "tensorflow": _version("tensorflow") or _version("tensorflow-cpu")}

    def _input(self, image: np.ndarray) -> np.ndarray:
        arr = np.asarray(image, dtype=np.float32)
        arr = arr[..., None] if arr.ndim == 2 else arr[..., :3]
        if arr.shape[2] != self.channels:
            arr = np.repeat(arr, self.channels, axis=2) if arr.shape[2] == 1 else arr.mean(axis=2, keepdims=True)
        lo, hi = np.percentile(arr, PERCENTILES)
        arr = (arr - lo) / max(hi - lo, 1e-6)
        return arr[..., 0] if self.channels == 1 else arr

    def __call__(self, image: np.ndarray, mpp: float) -> Nuclei:
        mpp = float(mpp)
        if not np.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"mpp must be a positive number of um per pixel, not {mpp}")
        od = darkness(np.asarray(image))  # also checks dtype and shape
        scale = None if self.model_mpp is None else mpp / self.model_mpp
        with contextlib.redirect_stdout(io.StringIO()):
            labels, details = self.model.predict_instances(
                self._input(image), prob_thresh=self.prob_thresh, nms_thresh=self.nms_thresh,
                scale=None if scale is None or abs(scale - 1) < 1e-3 else scale, show_tile_progress=False)
        labels = np.asarray(labels, dtype=np.int32)
        m = label_measures(labels, od, mpp)
        keep = m["area_um2"] >= self.min_area_um2
        m = {k: v[keep] for k, v in m.items()}
        prob = np.asarray(details["prob"], dtype=float)  # polygon i is label i + 1 (where later ones left it any pixel)
        remap = np.zeros(int(labels.max()) + 1, dtype=np.int32)
        remap[m["label"]] = np.arange(1, len(m["label"]) + 1)
        nan = np.full(len(m["label"]), np.nan)
        return Nuclei(x=m["x"], y=m["y"], area_um2=m["area_um2"], darkness=m["darkness"],
                      confidence=prob[m["label"] - 1], cell_area_um2=nan, nc_ratio=nan.copy(), mpp=mpp,
                      labels=remap[labels], labels_mpp=mpp)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
