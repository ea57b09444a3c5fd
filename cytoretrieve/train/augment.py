"""What the model sees: DINO's global (and optional local) views, cytology additions (vertical flips, 90-degree
rotations, HED stain jitter) and cervical-cell copy-paste.

Pure PIL + numpy, every random draw from an explicit `numpy.random.Generator`: a sample's views depend only on
(seed, epoch, index), never on the worker that made them, so a resumed run sees exactly the same images.
The views are uint8 (3, H, W) tensors: normalisation happens on the device (less to decode, pin and copy).

DINO's views (main_dino.DataAugmentationDINO): random resized crop (bicubic), horizontal flip 0.5, colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in random order) with p 0.8, grayscale 0.2; Gaussian blur
(radius 0.1-2) always on view 1, p 0.1 on view 2 and 0.5 on local views; solarisation p 0.2 on view 2. One
deliberate difference: the hue jitter rotates colours about the grey axis (YIQ) instead of shifting the HSV hue
channel, the same kind of change at a fraction of the cost (see `adjust_hue`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from cytoretrieve.models.preprocess import border_colour, to_rgb
from cytoretrieve.train.config import IMAGENET_MEAN, IMAGENET_STD, PasteSpec, ViewSpec  # the run's settings

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR

# Ruifrok & Johnston stain vectors, as in skimage.color (rgb_from_hed)
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = math.log(1e-6)


class DinoViews:
    """`views(image, rng)` -> [global 1, global 2, local 1..n] as uint8 tensors (3, size, size)."""

    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> list[torch.Tensor]:
        return [to_uint8_tensor(v) for v in self.images(image, rng)]

    def images(self, image: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
        s = self.spec
        image = to_rgb(image)
        out = [
            self._view(image, rng, s.image_size, s.global_scale, blur_p=1.0, solarize_p=0.0),
            self._view(image, rng, s.image_size, s.global_scale, blur_p=0.1, solarize_p=0.2),
        ]
        for _ in range(s.local_crops):
            out.append(self._view(image, rng, s.local_size, s.local_scale, blur_p=0.5, solarize_p=0.0))
        return out

    def _view(self, image: Image.Image, rng: np.random.Generator, size: int, scale: tuple[float, float],
              blur_p: float, solarize_p: float) -> Image.Image:
        s = self.spec
        view = random_resized_crop(image, size, scale, rng)
        view = orient(view, rng, vflip=s.vflip, rot90=s.rot90)
        if s.hed_jitter > 0:
            view = hed_jitter(view, rng, s.hed_jitter)
        if rng.random() < 0.8:
            view = colour_jitter(view, rng, saturation=0.2 * s.colour_strength, hue=0.1 * s.colour_strength)
        if rng.random() < s.grayscale_p:
            view = view.convert("L").convert("RGB")
        if rng.random() <= blur_p:
            view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if rng.random() < solarize_p:
            view = ImageOps.solarize(view)
        return view


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


def normalize(batch: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float, on whatever device the batch is."""
    m = torch.tensor(mean, device=batch.device, dtype=dtype).view(1, 3, 1, 1) * 255
    sd = torch.tensor(std, device=batch.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (batch.to(dtype) - m) / sd


# --- DINO's transforms, with explicit randomness -------------------------------------------------------------


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop (10 tries at a random area fraction and log-uniform aspect ratio, then
    a centre crop fallback), resized with bicubic interpolation."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            box = (j, i, j + w, i + h)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        i, j = (height - h) // 2, (width - w) // 2
        box = (j, i, j + w, i + h)
    return image.resize((size, size), BICUBIC, box=box)


def orient(image: Image.Image, rng: np.random.Generator, *, vflip: bool = True, rot90: bool = True) -> Image.Image:
    """Horizontal flip (0.5, DINO), and for cells, which have no orientation: vertical flip (0.5) and a rotation
    by 0, 90, 180 or 270 degrees (uniform)."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if vflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rot90:
        k = int(rng.integers(0, 4))
        if k:
            image = image.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[k - 1])
    return image


def colour_jitter(image: Image.Image, rng: np.random.Generator, brightness: float = 0.4, contrast: float = 0.4,
                  saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """torchvision's ColorJitter on PIL images: the four adjustments in a random order, factors uniform in
    [1 - x, 1 + x] (hue: [-hue, hue])."""
    factors = (
        rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
        rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
        rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
        rng.uniform(-hue, hue),
    )
    for fn in rng.permutation(4):
        f = factors[fn]
        if fn == 0:
            image = ImageEnhance.Brightness(image).enhance(f)
        elif fn == 1:
            image = ImageEnhance.Contrast(image).enhance(f)
        elif fn == 2:
            image = ImageEnhance.Color(image).enhance(f)
        else:
            image = adjust_hue(image, f)
    return image


def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """Rotate hues by `factor` of a full turn: a rotation about the grey axis in YIQ space (CSS `hue-rotate`),
    one affine colour transform in PIL's C code. torchvision shifts the H channel in HSV instead, which costs
    two colour-space conversions and was 40% of a view's time; both keep grey pixels grey."""
    theta = 2 * math.pi * factor
    c, s = math.cos(theta), math.sin(theta)
    m = _YIQ_TO_RGB @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]]) @ _RGB_TO_YIQ  # + turns red towards green, as HSV
    matrix = (m[0, 0], m[0, 1], m[0, 2], 0.0, m[1, 0], m[1, 1], m[1, 2], 0.0, m[2, 0], m[2, 1], m[2, 2], 0.0)
    return image.convert("RGB", matrix=tuple(float(v) for v in matrix))


_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def hed_jitter(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Stain augmentation in HED space (Tellez et al. 2018): each stain channel is scaled by U(1-sigma, 1+sigma)
    and shifted by U(-sigma, sigma), with skimage's rgb2hed / hed2rgb matrices. Unlike rgb2hed, negative stain
    values are kept (Pap stains such as orange G fall outside the H&E gamut), so sigma -> 0 is the identity."""
    rgb = np.maximum(np.asarray(image, dtype=np.float32) / 255.0, 1e-6)
    stains = (np.log(rgb) / _LOG_ADJUST) @ HED_FROM_RGB.astype(np.float32)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3).astype(np.float32)
    beta = rng.uniform(-sigma, sigma, size=3).astype(np.float32)
    stains = stains * alpha + beta
    out = np.exp((stains * _LOG_ADJUST) @ RGB_FROM_HED.astype(np.float32))
    return Image.fromarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


# --- cervical cell copy-paste -------------------------------------------------------------------------------


class CellBank:
    """Single cells to paste: image files (with their masks, where the dataset has them) or cell crops of a
    slide (tile-table rows, as `cytoretrieve annotations import` writes to `<table>_cells`). Picklable."""

    def __init__(self, items: Sequence[str | dict], masks: Sequence[str | None]) -> None:
        self.items = list(items)
        self.masks = list(masks)
        self._alphas: dict[int, tuple[tuple[int, int, int, int], Image.Image]] = {}  # per process, filled on use
        self._reader = None
        if any(isinstance(item, dict) for item in self.items):
            from cytoretrieve.sources.slides.reader import SlideReader

            self._reader = SlideReader()

    def __len__(self) -> int:
        return len(self.items)

    def cutout(self, i: int) -> tuple[Image.Image, Image.Image]:
        """The cell (RGB) and its soft alpha (L), both cropped to the cell. The alpha is computed once per cell and
        process and then kept (the threshold of a mask-less cell cost ~0.3 s, most of a pasted image's time)."""
        item = self.items[i]
        if isinstance(item, dict):
            cell = self._reader.read_row(item)
        else:
            with Image.open(item) as im:
                cell = to_rgb(im)
                cell.load()
        if i not in self._alphas:
            alpha = cell_alpha(cell, self._mask(i))
            box = alpha.getbbox() or (0, 0, *cell.size)
            self._alphas[i] = (box, alpha.crop(box))
        box, alpha = self._alphas[i]
        return cell.crop(box), alpha

    def _mask(self, i: int) -> Image.Image | None:
        if not self.masks[i]:
            return None
        with Image.open(self.masks[i]) as m:
            mask = m.convert("RGB")
            mask.load()
        return mask


def cell_alpha(cell: Image.Image, mask: Image.Image | None = None) -> Image.Image:
    """A soft alpha (L, 0..255) separating a cell from its background, feathered at the edge.

    With a mask (Herlev's `-d.bmp`): foreground = pixels whose colour differs from the mask's border colour.
    Without one, a simple threshold: flat letterbox bands are cut off, then Otsu on the optical density (stained
    cells are darker than the bright background), opening and closing, holes filled, and the component under the
    centre kept. When that finds nothing sensible (under 2% or over 90% of the crop: the cell fills the frame)
    an ellipse inscribed in the crop stands in.
    """
    w, h = cell.size
    if mask is not None:
        m = np.asarray(mask.resize((w, h), Image.Resampling.NEAREST), dtype=np.int16)
        fg = np.abs(m - np.array(border_colour(mask), dtype=np.int16)).max(axis=2) > 24
    else:
        fg = _threshold_mask(cell)
    radius = max(1, round(0.02 * min(w, h)))
    alpha = Image.fromarray(fg.astype(np.uint8) * 255, "L")
    alpha = alpha.filter(ImageFilter.MinFilter(2 * radius + 1)).filter(ImageFilter.GaussianBlur(radius))
    return alpha


def _threshold_mask(cell: Image.Image) -> np.ndarray:
    pixels = np.asarray(cell, dtype=np.float32)
    h, w = pixels.shape[:2]
    top, bottom, left, right = _letterbox_bounds(pixels)
    inner = pixels[top:bottom, left:right]
    fg = np.zeros((h, w), dtype=bool)
    if inner.shape[0] < 4 or inner.shape[1] < 4:
        return _ellipse(h, w, (0, h, 0, w))
    density = -np.log((inner + 1.0) / 256.0).sum(axis=2)
    t = _otsu(density)
    raw = Image.fromarray(((density > t) * 255).astype(np.uint8), "L")
    k = 5 if min(inner.shape[:2]) >= 40 else 3
    clean = raw.filter(ImageFilter.MinFilter(k)).filter(ImageFilter.MaxFilter(k))  # opening
    clean = clean.filter(ImageFilter.MaxFilter(k)).filter(ImageFilter.MinFilter(k))  # closing
    region = _centre_component(_fill_holes(clean))
    coverage = region.mean()
    if not 0.02 <= coverage <= 0.9:
        return _ellipse(h, w, (top, bottom, left, right))
    fg[top:bottom, left:right] = region
    return fg


def _letterbox_bounds(pixels: np.ndarray, tol: float = 6.0) -> tuple[int, int, int, int]:
    """Rows / columns at the edges that are one flat colour (letterbox padding) are cut off."""
    edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colour = np.median(edge, axis=0)
    flat = np.abs(pixels - colour).max(axis=2) <= tol
    top, bottom = _inner_span(flat.all(axis=1))
    left, right = _inner_span(flat.all(axis=0))
    return top, bottom, left, right


def _inner_span(flat: np.ndarray) -> tuple[int, int]:
    """[start, end) of `flat` without its leading and trailing True runs."""
    start, end = 0, len(flat)
    while start < end and flat[start]:
        start += 1
    while end > start and flat[end - 1]:
        end -= 1
    return start, end


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = hist.astype(np.float64)
    w0 = np.cumsum(weight)
    w1 = w0[-1] - w0
    m0 = np.cumsum(weight * centres)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def _fill_holes(mask: Image.Image) -> np.ndarray:
    padded = Image.new("L", (mask.width + 2, mask.height + 2), 0)
    padded.paste(mask, (1, 1))
    ImageDraw.floodfill(padded, (0, 0), 128)
    return np.asarray(padded)[1:-1, 1:-1] != 128


def _centre_component(fg: np.ndarray) -> np.ndarray:
    h, w = fg.shape
    cy, cx = h // 2, w // 2
    if not fg[cy, cx]:
        return fg
    image = Image.fromarray(fg.astype(np.uint8) * 255, "L")
    ImageDraw.floodfill(image, (cx, cy), 100)
    return np.asarray(image) == 100


def _ellipse(h: int, w: int, bounds: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = bounds
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (top + bottom - 1) / 2, (left + right - 1) / 2
    ry, rx = max((bottom - top) / 2 * 0.95, 1), max((right - left) / 2 * 0.95, 1)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def paste_cells(tile: Image.Image, bank: CellBank, rng: np.random.Generator, spec: PasteSpec) -> Image.Image:
    """Paste 1..spec.max_cells random cells at random positions, sizes, rotations and flips, alpha-blended."""
    tile = to_rgb(tile).copy()
    width, height = tile.size
    for _ in range(int(rng.integers(1, spec.max_cells + 1))):
        cell, alpha = bank.cutout(int(rng.integers(0, len(bank))))
        factor = rng.uniform(spec.scale[0], spec.scale[1]) * min(width, height) / max(cell.size)
        size = (max(2, round(cell.width * factor)), max(2, round(cell.height * factor)))
        cell, alpha = cell.resize(size, BICUBIC), alpha.resize(size, BILINEAR)
        if rng.random() < 0.5:
            cell, alpha = cell.transpose(Image.Transpose.FLIP_LEFT_RIGHT), alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        angle = rng.uniform(0.0, 360.0)
        cell = cell.rotate(angle, BICUBIC, expand=True)
        alpha = alpha.rotate(angle, BILINEAR, expand=True)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        tile.paste(cell, (int(round(cx - cell.width / 2)), int(round(cy - cell.height / 2))), alpha)
    return tile
