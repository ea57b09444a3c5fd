"""Image -> model input: the one transform used for embedding, queries and store thumbnails.

Cells come in very different shapes (~30x100 to 280x350 px), so the framing policy matters: the default
`letterbox` keeps the aspect ratio and pads with the image's own background colour rather than black.
Pure PIL + numpy (no torchvision), and a frozen dataclass so it pickles into DataLoader workers.
"""

from __future__ import annotations

import functools
import io
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.models.stain import NONE, cached_normaliser, check_stain, make_normaliser

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZES = ("letterbox", "stretch", "center-crop")
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# px, side of the JPEG thumbnail stored with each row: large enough to judge chromatin, and the input side of most
# backbones, so that the picture shown is the model's own frame, not resampled (tables made before keep 96 px ones)
THUMBNAIL_SIZE = 224


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a normalised (3, size, size) float tensor; part of the backbone fingerprint."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "letterbox"
    stain: str = "none"  # a stain normaliser of `models.stain` applied to the framed image, or none
    stain_target: tuple[float, ...] = ()  # its target (empty: the normaliser's shipped default)

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
        self._check_stain()

    def _check_stain(self) -> None:
        """Resolve `stain` (a known normaliser, its default target filled in), so the recorded target is explicit."""
        name = check_stain(self.stain)
        object.__setattr__(self, "stain", name)
        if name == NONE:
            if self.stain_target:
                raise CytoError("a `stain_target` needs a `stain` normaliser (macenko, reinhard), not none")
            object.__setattr__(self, "stain_target", ())
            return
        target = make_normaliser(name, self.stain_target or None).target
        object.__setattr__(self, "stain_target", target)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists). The stain appears only when there is one, as
        `{"stain": {"method": name, "target": [...]}}`, so preprocessing without one (and its fingerprint) reads
        as before stain normalisation existed."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        stain, target = d.pop("stain"), d.pop("stain_target")
        if stain != NONE:
            d["stain"] = {"method": stain, "target": list(target)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict`; a missing size/mean/std or an unknown key is a CytoError."""
        if not isinstance(d, dict):
            raise CytoError(f"preprocessing must be a mapping, got {type(d).__name__}")
        fields = {"size", "mean", "std", "interpolation", "resize", "stain"}
        unknown, missing = set(d) - fields, {"size", "mean", "std"} - set(d)
        if unknown or missing:
            raise CytoError(f"bad preprocessing config {d}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        d = dict(d)
        stain = d.pop("stain", None)
        if stain is not None:
            if not isinstance(stain, dict) or "method" not in stain:
                raise CytoError(f"bad preprocessing stain {stain!r}: expected {{'method': name, 'target': [numbers]}}")
            d["stain"], d["stain_target"] = stain["method"], tuple(stain.get("target") or ())
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
        resized = image.resize((nw, nh), method)
        if (nw, nh) == (size, size):  # a square image fills the frame: no padding to compute (same pixels)
            return resized
        canvas = Image.new("RGB", (size, size), border_colour(image))
        canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
        return canvas

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Normalised float32 tensor (3, size, size)."""
        return self.to_tensor(self.frame(image))

    def to_tensor(self, framed: Image.Image) -> torch.Tensor:
        """Normalised float32 tensor (3, size, size) of an already framed RGB image.

        Each 8-bit value maps through a per-channel table of (v / 255 - mean) / std, computed once with the same
        float32 operations the arithmetic would do per pixel, so the values are identical; a table lookup written
        straight into channel-first order is ~10x cheaper than four float passes and a transpose. numpy, not torch:
        small torch ops fan out to OpenMP threads, which on a busy 2-core machine made them ~10x slower still.
        A `stain` normaliser maps the framed pixels first (so thumbnails keep the scanner's colours, and a grey
        image raises `models.stain.GreyImageError`).
        """
        pixels = np.asarray(to_rgb(framed))
        if self.stain != NONE:
            pixels = cached_normaliser(self.stain, self.stain_target).apply(pixels)
        table = _normalise_table(self.mean, self.std)
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(table[c], pixels[..., c], out=out[c])
        return torch.from_numpy(out)

    def thumbnail(self, image: Image.Image, size: int | None = None) -> bytes:
        """JPEG (quality 85) with the model's framing, `size` px (default `THUMBNAIL_SIZE`), for the store and views."""
        size = size or THUMBNAIL_SIZE
        return self.thumbnail_of(self.frame(image, max(size, self.size)), size)

    def inputs(self, image: Image.Image, thumbnail_size: int | None = None) -> tuple[torch.Tensor, bytes]:
        """(model tensor, thumbnail JPEG) of one image, framing it once: what the embedding job stores."""
        thumbnail_size = thumbnail_size or THUMBNAIL_SIZE
        framed = self.frame(image)
        if self.size < thumbnail_size:  # a small model input would make a blurry thumbnail: frame the source
            return self.to_tensor(framed), self.thumbnail(image, thumbnail_size)
        return self.to_tensor(framed), self.thumbnail_of(framed, thumbnail_size)

    @staticmethod
    def thumbnail_of(framed: Image.Image, size: int | None = None) -> bytes:
        """JPEG (quality 85) of a framed square image scaled to `size` px (default `THUMBNAIL_SIZE`).

        Bilinear (PIL's antialiased triangle filter) rather than bicubic: about half the cost for a picture that
        is only ever displayed; the framing is the model's, taken from the frame the model gets.
        """
        size = size or THUMBNAIL_SIZE
        if framed.size != (size, size):
            framed = framed.resize((size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        framed.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()


class ImageFiles(torch.utils.data.Dataset):
    """Opens and preprocesses images (model tensor + thumbnail) in DataLoader workers: image files, or any items a
    `load` function turns into images (slide tiles); an unreadable image yields its error instead.

    It lives here, not in `cytoretrieve.jobs.embed`, so that a worker process unpickling it imports only torch, numpy and
    PIL: importing `cytoretrieve.jobs.embed` (timm, lancedb) took a worker ~4 s longer to start, time the embedding job
    spent waiting for its first batch.
    """

    def __init__(self, items: Sequence[Any], preprocessing: Preprocessing, load: Callable[[Any], Image.Image] | None = None) -> None:
        self.items = [str(p) for p in items] if load is None else list(items)
        self.preprocessing = preprocessing
        self.load = load  # None: items are image paths; else a picklable reader, e.g. slide tiles from tile rows

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, bytes | None, str | None]:
        try:
            if self.load is not None:
                return i, *self.preprocessing.inputs(self.load(self.items[i])), None
            with Image.open(self.items[i]) as im:
                im.load()
                return i, *self.preprocessing.inputs(im), None
        except Exception as e:  # noqa: BLE001 - any decoding failure skips this one image, not the job
            return i, None, None, f"{type(e).__name__}: {e}".splitlines()[0]


def collate_images(
    items: list[tuple[int, Any, Any, Any]],
) -> tuple[list[int], torch.Tensor | None, list[bytes], list[tuple[int, str]]]:
    """DataLoader collate for `ImageFiles`: (indices, batch tensor or None, thumbnails, [(index, error)])."""
    good = [it for it in items if it[3] is None]
    bad = [(it[0], it[3]) for it in items if it[3] is not None]
    # np.stack, not torch.stack: one plain copy per image, while torch.stack fans out to OpenMP threads and was
    # ~20x slower on a busy 2-core machine; the batch tensor shares memory with the stacked array
    tensor = torch.from_numpy(np.stack([it[1].numpy() for it in good])) if good else None
    return [it[0] for it in good], tensor, [it[2] for it in good], bad


@functools.lru_cache(maxsize=16)
def _normalise_table(mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """(3, 256) float32: channel c's normalised value of each 8-bit level v, (v / 255 - mean[c]) / std[c]."""
    levels = np.arange(256, dtype=np.float32)[None, :] / 255.0
    table = (levels - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    table.flags.writeable = False
    return table


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
