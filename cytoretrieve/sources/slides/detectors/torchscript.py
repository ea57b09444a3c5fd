"""A learned segmenter the user brings: a TorchScript model file (InstanSeg's export, or any model that follows it).

InstanSeg (and the QuPath InstanSeg extension) ship their models as TorchScript files: `torch.jit.load` runs them
with nothing but torch, so no extra package is needed, and no weights are downloaded here: the user names the
file (`cells --detector instanseg --weights model.pt`, or just `--detector model.pt`). The convention followed is
InstanSeg's exported model:

- **input**: float32 (1, C, H, W), each channel normalised by its 0.1 and 99.9 percentiles to 0..1 (InstanSeg's
  `percentile_normalize`), at the model's pixel size: the scripted module's `pixel_size` attribute when it has one
  (InstanSeg models do), else the `model_mpp` setting, else the image is given as it is. Grey fields are repeated
  to `channels` (3 for brightfield RGB models) and RGB ones averaged to grey for a one-channel model;
- **call**: `model(x)`, plus `target_segmentation=tensor([1, 1])` when `forward` takes it (InstanSeg's switch for
  nuclei and cells);
- **output**: integer label maps (0 background, one value per object): (1, K, H, W), (K, H, W) or (H, W), or a
  tuple of such; K = 1 nuclei, K = 2 nuclei then cells (InstanSeg's "nuclei and cells" models).

Each nucleus label becomes one nucleus: its centroid, area (um^2), mean darkness (`darkness`), confidence 1 (a
label map carries no score). With a cell map, the cell a nucleus lies in (most of its pixels) gives `cell_area_um2`
and `nc_ratio`, NaN where the cell touches the image edge or holds more than one nucleus.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cytoretrieve.sources.slides.detectors import Nuclei, darkness

PERCENTILES = (0.1, 99.9)


def model_file(weights: str | Path | None, detector: str, what: str) -> Path:
    """The user's model file of a learned segmenter (`what` it should be): one clear error when it is not given
    or not there. Nothing is ever downloaded in its place."""
    if weights is None or str(weights) == "":
        raise ValueError(f"the {detector} detector needs the model file: --weights PATH ({what}; nothing is "
                         "downloaded)")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"no model file {path} for the {detector} detector")
    return path


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (`torch.jit.save`): a zip with a `code/` folder, unlike `torch.save` files."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def label_measures(labels: np.ndarray, od: np.ndarray, px_um: float) -> dict[str, np.ndarray]:
    """Per label 1..max (labels present only): `label`, centroid `x`, `y` (px), `area_um2` and mean `darkness`,
    all in one pass of `np.bincount` (no loop over objects)."""
    flat = labels.ravel().astype(np.int64)
    n = int(flat.max()) + 1 if flat.size else 1
    count = np.bincount(flat, minlength=n)
    rows, cols = np.indices(labels.shape)
    sx = np.bincount(flat, cols.ravel(), minlength=n)
    sy = np.bincount(flat, rows.ravel(), minlength=n)
    sod = np.bincount(flat, od.ravel().astype(np.float64), minlength=n)
    present = np.flatnonzero(count[1:] > 0) + 1
    c = count[present]
    return {"label": present, "x": sx[present] / c, "y": sy[present] / c, "area_um2": c * px_um**2,
            "darkness": sod[present] / c}


def cell_of(nuclei: np.ndarray, cells: np.ndarray, ids: np.ndarray, px_um: float) -> tuple[np.ndarray, np.ndarray]:
    """(cell area um^2, nucleus area / cell area) for the nucleus labels `ids`: the cell label covering most of
    each nucleus; NaN where none does, the cell touches the image edge or holds more than one nucleus."""
    area, nc = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
    inside = (nuclei > 0) & (cells > 0)
    if not inside.any() or not len(ids):
        return area, nc
    n_lab, c_lab = nuclei[inside].astype(np.int64), cells[inside].astype(np.int64)
    pairs, overlap = np.unique(np.c_[n_lab, c_lab], axis=0, return_counts=True)
    best: dict[int, int] = {}
    for (nl, cl), _ in sorted(zip(map(tuple, pairs), overlap), key=lambda t: t[1]):
        best[int(nl)] = int(cl)  # ascending overlap: the largest wins
    cell_px = np.bincount(cells.ravel().astype(np.int64))
    nucleus_px = np.bincount(nuclei.ravel().astype(np.int64))
    edge = set(np.unique(np.r_[cells[0], cells[-1], cells[:, 0], cells[:, -1]]).tolist())
    owners = np.bincount(np.fromiter(best.values(), dtype=np.int64), minlength=len(cell_px))
    for i, nl in enumerate(ids):
        cl = best.get(int(nl))
        if cl is None or cl in edge or owners[cl] != 1:
            continue
        area[i] = cell_px[cl] * px_um**2
        nc[i] = nucleus_px[nl] / cell_px[cl]
    return area, nc


class TorchScriptSegmenter:
    """A user's TorchScript segmentation model (InstanSeg's convention, see the module docstring) as a detector."""

    name = "torchscript"

    def __init__(self, weights: str | Path | None = None, model_mpp: float | None = None, channels: int | None = None,
                 min_area_um2: float = 0.0, name: str = "torchscript") -> None:
        path = model_file(weights, name, "a TorchScript .pt file, e.g. an InstanSeg model")
        if not is_torchscript(path):
            raise ValueError(f"{path} is not a TorchScript model file (torch.jit.save); {name} needs one")
        import torch

        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript, the format InstanSeg ships its models in
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
                self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise ValueError(f"{path} could not be loaded as TorchScript: {str(e).splitlines()[0]}") from None
        own = getattr(self.model, "pixel_size", None)
        self.model_mpp = float(own) if isinstance(own, int | float) and own > 0 else model_mpp
        if self.model_mpp is not None and not self.model_mpp > 0:
            raise ValueError(f"`model_mpp` must be positive, not {self.model_mpp}")
        if channels not in (None, 1, 3):
            raise ValueError(f"`channels` must be 1 or 3, not {channels}")
        self.channels = channels or 3
        try:
            args = [a.name for a in self.model.forward.schema.arguments]
        except AttributeError:
            args = []
        self.targets = "target_segmentation" in args
        self.min_area_um2 = float(min_area_um2)
        self.name = name
        self.settings: dict[str, Any] = {
            "detector": name, "weights": str(path.absolute()), "sha256_16": _digest(path),
            "model_mpp": self.model_mpp, "channels": self.channels, "min_area_um2": self.min_area_um2,
            "normalise_percentiles": list(PERCENTILES)}

    def _input(self, image: np.ndarray, mpp: float) -> tuple[Any, float]:
        """(the model's input tensor, its px per input px)."""
        import torch
        import torch.nn.functional as F

        arr = np.asarray(image, dtype=np.float32)
        arr = arr[..., None] if arr.ndim == 2 else arr[..., :3]
        if arr.shape[2] != self.channels:
            arr = np.repeat(arr, self.channels, axis=2) if arr.shape[2] == 1 else arr.mean(axis=2, keepdims=True)
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
        scale = 1.0 if self.model_mpp is None else mpp / self.model_mpp
        if abs(scale - 1.0) > 1e-3:
            size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        lo = torch.quantile(x.flatten(2)[..., :: max(1, x[0, 0].numel() // 1_000_000)], PERCENTILES[0] / 100, dim=2)
        hi = torch.quantile(x.flatten(2)[..., :: max(1, x[0, 0].numel() // 1_000_000)], PERCENTILES[1] / 100, dim=2)
        x = (x - lo[..., None, None]) / (hi - lo).clamp_min(1e-6)[..., None, None]
        return x, x.shape[-1] / arr.shape[1]

    def label_maps(self, image: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray | None, float]:
        """(nucleus labels, cell labels or None, px per input px) at the model's pixel size."""
        import torch

        x, scale = self._input(image, mpp)
        try:
            with torch.inference_mode():
                out = self.model(x, target_segmentation=torch.tensor([1, 1])) if self.targets else self.model(x)
        except (RuntimeError, torch.jit.Error) as e:  # a scripted `raise` arrives as torch.jit.Error
            raise ValueError(f"the {self.name} model failed on a {tuple(x.shape)} input: "
                             f"{str(e).strip().splitlines()[-1]}") from None
        maps = [o for o in out] if isinstance(out, tuple | list) else [out]
        planes: list[np.ndarray] = []
        for m in maps:
            a = m.detach().cpu().numpy()
            while a.ndim > 3 and a.shape[0] == 1:
                a = a[0]
            planes += [a] if a.ndim == 2 else list(a)
        if not planes or any(p.shape != tuple(x.shape[-2:]) for p in planes):
            shapes = [tuple(p.shape) for p in planes]
            raise ValueError(f"the {self.name} model gave {shapes or 'nothing'}, not label maps of the input's "
                             f"{tuple(x.shape[-2:])}")
        nuclei = np.rint(planes[0]).astype(np.int32)
        cells = np.rint(planes[1]).astype(np.int32) if len(planes) > 1 else None
        return nuclei, cells, scale

    def __call__(self, image: np.ndarray, mpp: float) -> Nuclei:
        mpp = float(mpp)
        if not np.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"mpp must be a positive number of um per pixel, not {mpp}")
        nuclei, cells, scale = self.label_maps(image, mpp)
        px = mpp / scale
        od = darkness(np.asarray(image))
        if od.shape != nuclei.shape:
            from scipy import ndimage as ndi

            od = ndi.zoom(od, (nuclei.shape[0] / od.shape[0], nuclei.shape[1] / od.shape[1]), order=1)
        m = label_measures(nuclei, od, px)
        keep = m["area_um2"] >= self.min_area_um2
        m = {k: v[keep] for k, v in m.items()}
        cell_area, nc = (cell_of(nuclei, cells, m["label"], px) if cells is not None
                         else (np.full(len(m["label"]), np.nan),) * 2)
        remap = np.zeros(int(nuclei.max()) + 1, dtype=np.int32)
        remap[m["label"]] = np.arange(1, len(m["label"]) + 1)
        return Nuclei(x=(m["x"] + 0.5) / scale - 0.5, y=(m["y"] + 0.5) / scale - 0.5, area_um2=m["area_um2"],
                      darkness=m["darkness"], confidence=np.ones(len(m["label"])), cell_area_um2=cell_area,
                      nc_ratio=nc, mpp=mpp, labels=remap[np.clip(nuclei, 0, None)], labels_mpp=px)
