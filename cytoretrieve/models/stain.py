"""Stain normalisation at embed time: a registry of normalisers (name -> class), each fitted to a target.

Scanners and stains differ between sites, and a k-NN over embeddings sees colour first; a normaliser maps each
image's stain colours onto a target's before the model sees it. Two classic methods, written here in numpy
(each is a few dozen lines; torchstain would add a dependency and a torch or TensorFlow round trip per image
for the same arithmetic):

- `macenko` (Macenko et al., 2009): the two stain vectors of an image found in optical-density space (the
  extreme angles, 1st and 99th percentile, in the plane of the two main eigenvectors of the stained pixels'
  OD), each pixel's two stain concentrations by least squares, rescaled so their 99th percentile matches the
  target's, and recomposed with the target's stain vectors. Target: the stain matrix (3 x 2) and the two 99th
  percentile concentrations.
- `reinhard` (Reinhard et al., 2001): each channel of the l-alpha-beta colour space shifted and scaled so its
  mean and std match the target's. The statistics are taken over the stained pixels only (glass and letterbox
  padding would otherwise weigh in); the map is applied to every pixel. Target: 3 means and 3 stds.

Pap stain is not H&E (haematoxylin with OG-6 and EA: three dyes, not two), so `macenko`'s two vectors are the
two main directions of the stain's colour, not two named dyes. The target is a flat tuple of numbers
(`StainNormaliser.target`), recorded in the table's metadata and in the backbone fingerprint through
`Preprocessing`; the shipped default of each method (`DEFAULT_TARGETS`) was fitted on a few Herlev cells
(`experiments/stain_transfer.py --fit-default` prints it again).

An image with too little stain (glass, an empty crop) is returned unchanged: there is nothing to normalise. A
grey image (no colour in its stained pixels: Cervix93, the ISBI stack, any grey scan given as RGB) is refused
with `GreyImageError`: its colours cannot be mapped onto a stain's, and a table must not mix normalised and
unnormalised vectors, so grey data is embedded with `stain` none.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.registry import Registry

NONE = "none"
IO = 240.0  # the glass's transmitted light, as in Macenko's paper and torchstain
BETA = 0.15  # optical density (any channel) above which a pixel is stain
MIN_STAINED = 64  # stained pixels below which an image is left as it is
GREY_CHROMA = 3.0  # mean (max - min channel) over the stained pixels below which an image is grey (8-bit levels)


class GreyImageError(CytoError):
    """A stain normaliser was given a grey image."""


class StainNormaliser:
    """Base class: `fit(image)` sets the target from a reference image, `apply(image)` maps an image onto it.

    Images are uint8 RGB arrays (H, W, 3). `target` is a flat tuple of floats (`N_TARGET` of them), the form
    recorded in a table's metadata; `from_target` rebuilds a normaliser from it.
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    N_TARGET: ClassVar[int] = 0

    def __init__(self, target: Sequence[float] | None = None) -> None:
        values = DEFAULT_TARGETS[self.name] if target is None else target
        try:
            self.target = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            self.target = ()
        if len(self.target) != self.N_TARGET or not np.all(np.isfinite(self.target)):
            raise CytoError(f"`stain` {self.name} needs a target of {self.N_TARGET} finite numbers, got {target!r}")

    def fit(self, image: np.ndarray) -> StainNormaliser:
        """Set the target from a reference image; a CytoError if it is grey or holds too little stain."""
        stats = self._stats(_rgb(image))
        if stats is None:
            raise CytoError(f"the `stain` {self.name} target image holds too little stain to fit "
                            f"(fewer than {MIN_STAINED} pixels above optical density {BETA})")
        self.target = tuple(float(v) for v in stats)
        return self

    def apply(self, image: np.ndarray) -> np.ndarray:
        """`image` (uint8 RGB) with its stain mapped onto the target's; unchanged if it holds too little stain."""
        rgb = _rgb(image)
        stats = self._stats(rgb)
        return rgb if stats is None else self._map(rgb, stats)

    def _stats(self, rgb: np.ndarray) -> np.ndarray | None:
        """The image's own statistics (the target's form), or None when it holds too little stain."""
        raise NotImplementedError

    def _map(self, rgb: np.ndarray, stats: np.ndarray) -> np.ndarray:
        raise NotImplementedError


NORMALISERS: Registry[type[StainNormaliser]] = Registry("stain normaliser", also=(NONE,))


def register_normaliser(cls: type[StainNormaliser]) -> type[StainNormaliser]:
    """Class decorator: make `cls` available as `stain` `cls.name` (`embed --stain`)."""
    if not cls.name or cls.name == NONE:
        raise ValueError(f"a stain normaliser needs a name other than {NONE!r}")
    return NORMALISERS.add(cls.name, cls)


def stain_names() -> list[str]:
    """`none` and every registered normaliser, for help texts and errors."""
    return [NONE, *NORMALISERS]


def check_stain(name: str | None) -> str:
    """The normaliser name (None -> none); a CytoError naming the choices for an unknown one."""
    name = NONE if name is None else str(name).strip().lower()
    if name != NONE and name not in NORMALISERS:
        raise CytoError(f"unknown `stain` {name!r}: use one of {', '.join(stain_names())}")
    return name


def make_normaliser(name: str, target: Sequence[float] | None = None) -> StainNormaliser:
    """The normaliser `name` with `target` (None: its shipped default)."""
    name = check_stain(name)
    if name == NONE:
        raise CytoError("`stain` none has no normaliser")
    return NORMALISERS[name](target)


def fit_target(name: str, rgb: np.ndarray) -> tuple[float, ...]:
    """The target of normaliser `name` fitted on an RGB uint8 image (`embed --stain-target`)."""
    return make_normaliser(name).fit(rgb).target


@functools.lru_cache(maxsize=8)
def cached_normaliser(name: str, target: tuple[float, ...]) -> StainNormaliser:
    """One normaliser per (name, target) per process: `Preprocessing` applies it to every image."""
    return make_normaliser(name, target)


# --- the methods ----------------------------------------------------------------------------------------


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) optical density of uint8 RGB pixels against the glass `IO`."""
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / IO)


def stained(od: np.ndarray) -> np.ndarray:
    """Which pixels are stain: optical density above `BETA` in every channel (Macenko's rule)."""
    return np.all(od > BETA, axis=1)


def _check_colour(rgb: np.ndarray, mask: np.ndarray, name: str) -> None:
    pixels = rgb.reshape(-1, 3)[mask].astype(np.int16)
    chroma = float(np.mean(pixels.max(axis=1) - pixels.min(axis=1)))
    if chroma < GREY_CHROMA:
        raise GreyImageError(f"`stain` {name} needs colour and this image is grey (its stain has no hue): "
                             "embed grey images with `stain` none")


@register_normaliser
class Macenko(StainNormaliser):
    """Macenko's stain vectors and concentrations (see the module docstring)."""

    name = "macenko"
    help = "stain vectors in optical density (Macenko 2009), concentrations matched to the target's"
    N_TARGET = 8  # stain matrix (3 x 2, row-major), then the two 99th-percentile concentrations
    ALPHA = 1.0  # percentile of the extreme angles

    def _stats(self, rgb: np.ndarray) -> np.ndarray | None:
        od = optical_density(rgb)
        mask = stained(od)
        if mask.sum() < MIN_STAINED:
            return None
        _check_colour(rgb, mask, self.name)
        matrix = self._stain_matrix(od[mask])
        if matrix is None:
            return None
        conc = self._concentrations(od, matrix)
        max_c = np.percentile(conc, 99, axis=1)
        if not np.all(max_c > 1e-6):
            return None
        return np.concatenate([matrix.reshape(-1), max_c])

    def _stain_matrix(self, od: np.ndarray) -> np.ndarray | None:
        """(3, 2) unit stain vectors, the darker-red-absorbing one (larger R optical density) first."""
        cov = np.cov(od.T)
        if not np.all(np.isfinite(cov)):
            return None
        _, vectors = np.linalg.eigh(cov)
        plane = vectors[:, [2, 1]]  # the two largest eigenvalues' vectors
        plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # eigenvectors' sign is arbitrary: point into OD > 0
        proj = od @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [self.ALPHA, 100 - self.ALPHA])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        matrix = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
        matrix *= np.where(matrix.sum(axis=0) < 0, -1.0, 1.0)
        norms = np.linalg.norm(matrix, axis=0)
        if not np.all(norms > 1e-6) or np.linalg.matrix_rank(matrix) < 2:
            return None
        return matrix / norms

    @staticmethod
    def _concentrations(od: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """(2, N) least-squares stain concentrations of every pixel."""
        return np.linalg.lstsq(matrix, od.T, rcond=None)[0]

    def _map(self, rgb: np.ndarray, stats: np.ndarray) -> np.ndarray:
        target = np.asarray(self.target)
        matrix_ref, max_ref = target[:6].reshape(3, 2), target[6:]
        od = optical_density(rgb)
        conc = self._concentrations(od, stats[:6].reshape(3, 2))
        conc *= (max_ref / stats[6:])[:, None]
        out = IO * np.exp(-(matrix_ref @ conc))
        return np.clip(out.T, 0, 255).round().astype(np.uint8).reshape(rgb.shape)


# Reinhard's RGB -> LMS matrix and the log-LMS -> l-alpha-beta rotation
_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
_LAB2LMS = np.linalg.inv(_LMS2LAB)
_LMS2RGB = np.linalg.inv(_RGB2LMS)


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) l-alpha-beta of uint8 RGB pixels (Reinhard 2001)."""
    lms = rgb.reshape(-1, 3).astype(np.float64) / 255.0 @ _RGB2LMS.T
    return np.log10(np.clip(lms, 1.0 / 255, None)) @ _LMS2LAB.T


def from_lab(lab: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB of l-alpha-beta values."""
    rgb = 10.0 ** (lab @ _LAB2LMS.T) @ _LMS2RGB.T
    return np.clip(rgb * 255.0, 0, 255).round().astype(np.uint8)


@register_normaliser
class Reinhard(StainNormaliser):
    """Reinhard's colour transfer in l-alpha-beta, statistics over the stained pixels (see the module docstring)."""

    name = "reinhard"
    help = "l-alpha-beta means and stds of the stained pixels matched to the target's (Reinhard 2001)"
    N_TARGET = 6  # three means, then three stds

    def _stats(self, rgb: np.ndarray) -> np.ndarray | None:
        mask = stained(optical_density(rgb))
        if mask.sum() < MIN_STAINED:
            return None
        _check_colour(rgb, mask, self.name)
        lab = to_lab(rgb)[mask]
        std = lab.std(axis=0)
        if not np.all(std > 1e-6):
            return None
        return np.concatenate([lab.mean(axis=0), std])

    def _map(self, rgb: np.ndarray, stats: np.ndarray) -> np.ndarray:
        target = np.asarray(self.target)
        lab = (to_lab(rgb) - stats[:3]) / stats[3:] * target[3:] + target[:3]
        return from_lab(lab).reshape(rgb.shape)


def _rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) array, or a CytoError saying what was given instead."""
    rgb = np.asarray(image)
    if rgb.ndim == 2:
        raise GreyImageError("stain normalisation needs colour and this image is grey (one channel): "
                             "embed grey images with `stain` none")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise CytoError(f"stain normalisation takes uint8 RGB images (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return rgb


# Fitted on a few Herlev cells (see the module docstring); the numbers, not the images, are shipped.
DEFAULT_TARGETS: dict[str, tuple[float, ...]] = {
    "macenko": (0.7235, 0.1943, 0.597, 0.8684, 0.3466, 0.4562, 1.6037, 1.2418),
    "reinhard": (-0.5776, -0.0793, 0.0099, 0.2349, 0.0468, 0.0117),
}
