"""Nucleus detectors for Pap-smear fields and slide tiles: name (or saved model file) -> detector.

Every detector is called the same way, `detector(image, mpp) -> Nuclei`: `image` a uint8 array, (H, W) grey or
(H, W, 3) RGB, `mpp` its pixel size in um; the result has one entry per nucleus, positions in pixels of the given
image and sizes in um^2, so a table of nuclei means the same at any scan resolution. Grey and RGB are both
accepted on purpose: brightfield stains absorb light, so both become one darkness map (optical density against
the glass, `darkness`) before anything else looks at them.

| name | module | needs |
|---|---|---|
| `classic` (default) | `classic.py`: darkness, background removal, seeds, watershed, size / shape / contrast rules | nothing |
| a path to a `.pt` file | `learned.py`: a small network trained from point annotations (`train_point_detector`) | the file |
| `instanseg`, `torchscript` (or a path to a TorchScript file) | `torchscript.py`: the user's TorchScript segmentation model (InstanSeg's export convention: normalised image in, nucleus [and cell] label maps out) | `weights=PATH`; torch only, nothing downloaded |
| `cellpose` | `cellpose.py`: the user's Cellpose 3 model file, run by Cellpose itself | `weights=PATH`; the `cellpose` extra |
| `stardist` | `stardist.py`: the user's StarDist 2D model folder, run by StarDist itself | `weights=FOLDER`; the `stardist` extra (TensorFlow) |

No detector downloads weights: the learned segmenters take the user's model file.

Each detector has a `name` and a JSON-able `settings` dict (kept with any table made from its output).
`register_detector(name, factory)` adds one; `get_detector(name_or_path, **settings)` builds one.
Nothing heavy is imported here: torch loads only when a learned model is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cytoretrieve.registry import Registry

DEFAULT_DETECTOR = "classic"
NUCLEUS_FIELDS = ("x", "y", "area_um2", "darkness", "confidence", "cell_area_um2", "nc_ratio")


@dataclass
class Nuclei:
    """The nuclei found in one image: one entry per nucleus in each array.

    `x`, `y`: pixels of the image given to the detector; `area_um2`: nucleus area; `darkness`: mean optical density
    inside the nucleus (against the glass); `confidence`: 0..1, higher is surer; `cell_area_um2` and `nc_ratio`
    (nucleus area / cell area): where the cell around the nucleus could be told apart from its neighbours, NaN
    otherwise. `labels` (optional): a label image at `labels_mpp`, nucleus i drawn as value i + 1, for previews.
    """

    x: np.ndarray
    y: np.ndarray
    area_um2: np.ndarray
    darkness: np.ndarray
    confidence: np.ndarray
    cell_area_um2: np.ndarray
    nc_ratio: np.ndarray
    mpp: float = float("nan")
    labels: np.ndarray | None = field(default=None, repr=False)
    labels_mpp: float = float("nan")

    def __post_init__(self) -> None:
        n = len(np.asarray(self.x))
        for name in NUCLEUS_FIELDS:
            arr = np.asarray(getattr(self, name), dtype=float).reshape(-1)
            if len(arr) != n:
                raise ValueError(f"Nuclei.{name} has {len(arr)} entries, x has {n}")
            setattr(self, name, arr)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def xy(self) -> np.ndarray:
        """(n, 2) array of x, y in pixels."""
        return np.c_[self.x, self.y]

    @classmethod
    def empty(cls, mpp: float = float("nan")) -> Nuclei:
        return cls(*(np.zeros(0) for _ in NUCLEUS_FIELDS), mpp=mpp)

    def subset(self, keep: np.ndarray) -> Nuclei:
        """The nuclei where `keep` (a boolean mask or index array) selects; the label image is dropped."""
        return Nuclei(*(getattr(self, name)[keep] for name in NUCLEUS_FIELDS), mpp=self.mpp)

    def columns(self) -> dict[str, np.ndarray]:
        """One array per field, for a table (pyarrow, pandas) of nuclei."""
        return {name: getattr(self, name) for name in NUCLEUS_FIELDS}


@runtime_checkable
class Detector(Protocol):
    """What every detector offers: a name, its settings, and the call on one image."""

    name: str
    settings: dict[str, Any]

    def __call__(self, image: np.ndarray, mpp: float) -> Nuclei: ...


DetectorFactory = Callable[..., Detector]
DETECTORS: Registry[DetectorFactory] = Registry("detector")


def register_detector(name: str, factory: DetectorFactory, *, replace: bool = False) -> None:
    """Make `get_detector(name, **settings)` call `factory(**settings)`; a taken name needs `replace=True`."""
    DETECTORS.add(name, factory, replace=replace)


def get_detector(name_or_path: str | Path = DEFAULT_DETECTOR, **settings: Any) -> Detector:
    """A registered detector built with `settings`, or the point-trained model saved at a path."""
    key = str(name_or_path)
    if key in DETECTORS:
        return DETECTORS[key](**settings)
    path = Path(key)
    if path.is_file():
        from cytoretrieve.sources.slides.detectors.torchscript import TorchScriptSegmenter, is_torchscript

        if is_torchscript(path):
            return TorchScriptSegmenter(path, **settings)
        from cytoretrieve.sources.slides.detectors.learned import load

        return load(path, **settings)
    known = ", ".join(sorted(DETECTORS)) or "none"
    raise ValueError(f"no detector named {key!r} (registered: {known}) and no model file at that path")


def _classic(**settings: Any) -> Detector:
    from cytoretrieve.sources.slides.detectors.classic import ClassicDetector

    return ClassicDetector(**settings)


register_detector("classic", _classic)


def _torchscript(name: str) -> DetectorFactory:
    def factory(**settings: Any) -> Detector:
        from cytoretrieve.sources.slides.detectors.torchscript import TorchScriptSegmenter

        return TorchScriptSegmenter(**settings, name=name)

    return factory


register_detector("torchscript", _torchscript("torchscript"))
register_detector("instanseg", _torchscript("instanseg"))


# Optional learned segmenters whose packages are extras (pyproject.toml): imported only when asked for.
def _cellpose(**settings: Any) -> Detector:
    from cytoretrieve.sources.slides.detectors.cellpose import CellposeSegmenter

    return CellposeSegmenter(**settings)


register_detector("cellpose", _cellpose)


def _stardist(**settings: Any) -> Detector:
    from cytoretrieve.sources.slides.detectors.stardist import StarDistSegmenter

    return StarDistSegmenter(**settings)


register_detector("stardist", _stardist)


def darkness(image: np.ndarray) -> np.ndarray:
    """Optical density against the glass, float32 (H, W), 0 on clear glass; RGB averages its three channels.

    The glass level of each channel is its 98th percentile: the clear glass of a field (or, on a field covered
    with cells, its palest cytoplasm), so each field is referred to its own background light.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, not {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"image must be (H, W) grey or (H, W, 3) RGB, not shape {np.asarray(image).shape}")
    total = np.zeros(arr.shape[:2], dtype=np.float32)
    for c in range(arr.shape[2]):
        channel = arr[..., c]
        hist = np.bincount(channel.ravel(), minlength=256)
        glass = max(float(np.searchsorted(np.cumsum(hist), 0.98 * channel.size)), 1.0)
        total += np.log10(glass / np.maximum(channel.astype(np.float32), 1.0))
    return np.clip(total / arr.shape[2], 0.0, None)
