"""A user's Cellpose model as a nucleus detector (`cells --detector cellpose --weights MODEL`): the `cellpose` extra.

Cellpose 3 saves a model as a plain torch state dict of its U-Net (`CPnet`): what the Cellpose GUI and
`cellpose --train` write for a model trained on your own fields, and the format of its built-in models. The file is
read with `torch.load(weights_only=True)`; the network is rebuilt from the shapes of its weights (so a model of any
width loads, not only Cellpose's default one) and run by Cellpose's own `CellposeModel.eval` (normalisation,
tiling, flow following), so masks are what Cellpose itself would give. Nothing is downloaded: the weights file is
the user's. Cellpose is imported only when this detector is built.

- **pixel size**: Cellpose segments objects of the model's own diameter (`diam_mean` px, stored in the file); the
  image is rescaled so that a nucleus `diameter_um` across spans it: `diameter = diameter_um / mpp` px. Without
  `diameter_um`, `model_mpp` (the pixel size the model was trained at) gives it from the model's mean training
  diameter (`diam_labels` px x `model_mpp`), else `DEFAULT_DIAMETER_UM`;
- **input**: grey as it is, RGB averaged to grey (Cellpose's `channels=[0, 0]`, what its GUI uses for one-colour
  images); `invert` for models trained on bright nuclei on a dark ground (fluorescence, Cellpose's `nuclei`);
- **output**: one nucleus per mask: centroid, area (um^2), mean darkness, and as `confidence` the mean cell
  probability (sigmoid of Cellpose's cellprob) inside the mask. Cellpose's nucleus masks carry no cell outline, so
  `cell_area_um2` and `nc_ratio` are NaN.

Cellpose-SAM models (cellpose 4) are not supported: cellpose 4 always builds a ViT-L image encoder (SAM's or
DINOv3's, hundreds of millions of weights), and cellpose 3.0.10 to 3.1.x cap numpy (< 2.0, then < 2.1), so the
extra pins cellpose 3.0.0-3.0.9 (see pyproject.toml): the CPnet and file format of Cellpose 3's models (cyto3,
nuclei and those trained from them; its optional `transformer` backbone is not read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cytoretrieve.sources.slides.detectors import Nuclei, darkness
from cytoretrieve.sources.slides.detectors.torchscript import _digest, label_measures, model_file

DEFAULT_DIAMETER_UM = 8.0  # an intermediate squamous cell's nucleus; HSIL nuclei are larger, pyknotic ones smaller
FIRST_CONV = "downsample.down.res_down_{}.proj.1.weight"  # CPnet: each level's 1x1 projection, (out, in, 1, 1)
OUTPUT = "output.2.weight"  # CPnet: the last 1x1 convolution, (3, nbase[1], 1, 1): flows y, x and cellprob
INSTALL = "pip install 'cytoretrieve[cellpose]'"


def read_cpnet(path: Path) -> tuple[dict[str, Any], list[int], int]:
    """(state dict, nbase [channels in, widths...], outputs) of a Cellpose 3 model file, or ValueError saying why not."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file at all, or one holding more than tensors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a Cellpose model file (torch.load: {first[:160]})") from None
    if not isinstance(state, dict) or FIRST_CONV.format(0) not in state or OUTPUT not in state:
        if isinstance(state, dict) and any(str(k).startswith(("encoder.", "module.encoder.")) for k in state):
            raise ValueError(f"{path} looks like a Cellpose-SAM (cellpose 4) model; the cellpose detector reads "
                             "Cellpose 3 models (a CPnet state dict)")
        raise ValueError(f"{path} is not a Cellpose model file (no CPnet weights `{FIRST_CONV.format(0)}`)")
    nbase = [int(state[FIRST_CONV.format(0)].shape[1])]
    level = 0
    while FIRST_CONV.format(level) in state:
        nbase.append(int(state[FIRST_CONV.format(level)].shape[0]))
        level += 1
    return state, nbase, int(state[OUTPUT].shape[0])


class CellposeSegmenter:
    """A Cellpose 3 model file (see the module docstring) as a detector."""

    name = "cellpose"

    def __init__(self, weights: str | Path | None = None, diameter_um: float | None = None,
                 model_mpp: float | None = None, invert: bool = False, flow_threshold: float = 0.4,
                 cellprob_threshold: float = 0.0, min_area_um2: float = 4.0, name: str = "cellpose") -> None:
        path = model_file(weights, name, "a Cellpose 3 model, e.g. one trained in the Cellpose GUI")
        for key, value in (("diameter_um", diameter_um), ("model_mpp", model_mpp)):
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"`{key}` must be a positive number, not {value}")
        if min_area_um2 < 0:
            raise ValueError(f"`min_area_um2` must not be negative, not {min_area_um2}")
        try:
            from cellpose.models import CellposeModel
            from cellpose.resnet_torch import CPnet
        except ImportError as e:
            raise ValueError(f"the {name} detector needs the cellpose package ({INSTALL}): {e}") from None
        state, nbase, nout = read_cpnet(path)
        diam_mean = float(state["diam_mean"].reshape(-1)[0]) if "diam_mean" in state else 30.0  # cellpose < 2: 30
        diam_labels = float(state["diam_labels"].reshape(-1)[0]) if "diam_labels" in state else diam_mean
        net = CPnet(list(nbase), nout, sz=3, mkldnn=False, max_pool=True, diam_mean=diam_mean)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit a Cellpose network of widths {nbase[1:]}: "
                             f"{str(e).strip().splitlines()[-1].strip()[:200]}") from None
        net.eval()
        # Cellpose's runner (normalisation, tiling, flow following) around our network: built without weights
        # (no file named, so nothing is looked up or downloaded), then given the file's network.
        self.model = CellposeModel(gpu=False, pretrained_model=False, nchan=nbase[0], diam_mean=diam_mean)
        self.model.net, self.model.nbase, self.model.nclasses = net, list(nbase), nout
        self.model.diam_mean, self.model.diam_labels = diam_mean, diam_labels
        self.diameter_um = float(diameter_um if diameter_um is not None
                                 else diam_labels * model_mpp if model_mpp is not None else DEFAULT_DIAMETER_UM)
        self.invert = bool(invert)
        self.flow_threshold, self.cellprob_threshold = float(flow_threshold), float(cellprob_threshold)
        self.min_area_um2 = float(min_area_um2)
        self.name = name
        self.settings: dict[str, Any] = {
            "detector": name, "weights": str(path.absolute()), "sha256_16": _digest(path),
            "diameter_um": self.diameter_um, "model_mpp": model_mpp, "invert": self.invert,
            "flow_threshold": self.flow_threshold, "cellprob_threshold": self.cellprob_threshold,
            "min_area_um2": self.min_area_um2, "diam_mean_px": diam_mean, "diam_labels_px": diam_labels,
            "widths": nbase[1:], "channels_in": nbase[0], "cellpose": _version("cellpose")}

    def masks(self, image: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
        """(Cellpose's label image, its cell probability logits), both at the image's own size."""
        import torch

        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            grey = arr[..., :3].astype(np.float32).mean(axis=2)
        elif arr.ndim == 2:
            grey = arr.astype(np.float32)
        else:
            raise ValueError(f"image must be (H, W) grey or (H, W, 3) RGB, not shape {arr.shape}")
        with torch.inference_mode():
            labels, flows, _ = self.model.eval(
                grey, channels=[0, 0], diameter=self.diameter_um / mpp, invert=self.invert,
                flow_threshold=self.flow_threshold, cellprob_threshold=self.cellprob_threshold,
                min_size=max(1, int(round(self.min_area_um2 / mpp**2))))
        return np.asarray(labels, dtype=np.int32), np.asarray(flows[2], dtype=np.float32)

    def __call__(self, image: np.ndarray, mpp: float) -> Nuclei:
        mpp = float(mpp)
        if not np.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"mpp must be a positive number of um per pixel, not {mpp}")
        od = darkness(np.asarray(image))  # also checks dtype and shape
        labels, cellprob = self.masks(image, mpp)
        m = label_measures(labels, od, mpp)
        keep = m["area_um2"] >= self.min_area_um2
        m = {k: v[keep] for k, v in m.items()}
        flat = labels.ravel().astype(np.int64)
        prob = 1.0 / (1.0 + np.exp(-np.clip(cellprob.ravel().astype(np.float64), -50, 50)))
        size = int(flat.max()) + 1 if flat.size else 1
        confidence = (np.bincount(flat, prob, minlength=size)[m["label"]]
                      / np.maximum(np.bincount(flat, minlength=size)[m["label"]], 1))
        remap = np.zeros(size, dtype=np.int32)
        remap[m["label"]] = np.arange(1, len(m["label"]) + 1)
        nan = np.full(len(m["label"]), np.nan)
        return Nuclei(x=m["x"], y=m["y"], area_um2=m["area_um2"], darkness=m["darkness"], confidence=confidence,
                      cell_area_um2=nan, nc_ratio=nan.copy(), mpp=mpp, labels=remap[labels], labels_mpp=mpp)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
