"""Image -> model input: the one transform used for embedding, queries and store thumbnails.

Cells come in very different shapes (~30x100 to 280x350 px), so the framing policy matters: the default
`letterbox` keeps the aspect ratio and pads with the image's own background colour rather than black.
Pure PIL + numpy (no torchvision), and a frozen dataclass so it pickles into DataLoader workers.
"""

from __future__ import annotations

import io
import operator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cytoretrieve.errors import CytoError

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZES = ("letterbox", "stretch", "center-crop")
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a normalised (3, size, size) float tensor; part of the backbone fingerprint."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "letterbox"

    def __post_init__(self) -> None:
        try:
            size = operator.index(self.size)
        except TypeError:
            size = 0
        if isinstance(self.size, bool) or size < 1:
            raise CytoError(f"image size must be a positive integer, got {self.size!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if any(s <= 0 for s in self.std):
            raise CytoError(f"preprocessing std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise CytoError(f"unknown interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        if self.resize not in RESIZES:
            raise CytoError(f"unknown resize policy {self.resize!r}: use one of {', '.join(RESIZES)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict`; a missing size/mean/std or an unknown key is a CytoError."""
        if not isinstance(d, dict):
            raise CytoError(f"preprocessing must be a mapping, got {type(d).__name__}")
        fields = {"size", "mean", "std", "interpolation", "resize"}
        unknown, missing = set(d) - fields, {"size", "mean", "std"} - set(d)
        if unknown or missing:
            raise CytoError(f"bad preprocessing config {d}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(**d)

    def frame(self, image: Image.Image, size: int | None = None) -> Image.Image:
        """The RGB image framed as the model sees it (letterboxed / stretched / cropped), `size` px square."""
        image = to_rgb(image)
        size = size or self.size
        method = INTERPOLATIONS[self.interpolation]
        if self.resize == "stretch":
            return image.resize((size, size), method)
        w, h = image.size
        if self.resize == "center-crop":
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            left, top = (nw - size) // 2, (nh - size) // 2
            return image.resize((nw, nh), method).crop((left, top, left + size, top + size))
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), border_colour(image))
        canvas.paste(image.resize((nw, nh), method), ((size - nw) // 2, (size - nh) // 2))
        return canvas

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Normalised float32 tensor (3, size, size)."""
        pixels = np.asarray(self.frame(image), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((tensor - mean) / std).contiguous()

    def thumbnail(self, image: Image.Image, size: int = 96) -> bytes:
        """Small JPEG (quality 85) with the model's framing, for the store and search results."""
        buffer = io.BytesIO()
        self.frame(image, size).save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha is composited on white (bright-field background), 16-bit scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.size and pixels.max() > 255:  # 16-bit data: 0..65535 -> 0..255
            pixels = pixels / 257.0
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """Per-channel median of the outermost pixels of an RGB image: the padding that looks like background."""
    pixels = np.asarray(image)
    edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    r, g, b = (int(v) for v in np.median(edge, axis=0).round())
    return r, g, b


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise CytoError(f"preprocessing {name} must be 3 numbers (R, G, B), got {values!r}")
    return out  # type: ignore[return-value]
