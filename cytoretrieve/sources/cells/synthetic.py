"""Synthetic Pap-stained cells, so the demo and the tests run on a fresh machine with no dataset and no internet.

Seven classes follow Herlev's morphology cues: the nucleus grows and darkens from superficial to carcinoma in
situ, columnar cells are elongated, dysplastic nuclei get irregular outlines. The images are drawn, not real:
they show the pipeline working, not what a backbone learns from real cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class CellClass:
    code: str
    name: str
    binary: int
    nucleus: float  # nucleus radius as a fraction of the cell radius
    darkness: float  # 0 pale .. 1 hyperchromatic
    elongation: float  # cell aspect ratio
    irregular: float  # nucleus outline jitter
    cytoplasm: tuple[int, int, int]  # Pap stain: pink (superficial) .. blue-green


CLASSES = (
    CellClass("NS", "normal_superficial", 0, 0.10, 0.55, 1.2, 0.00, (236, 150, 170)),
    CellClass("NI", "normal_intermediate", 0, 0.16, 0.45, 1.3, 0.00, (150, 190, 200)),
    CellClass("NC", "normal_columnar", 0, 0.30, 0.50, 2.4, 0.02, (170, 180, 210)),
    CellClass("LD", "light_dysplastic", 1, 0.32, 0.60, 1.3, 0.06, (150, 185, 205)),
    CellClass("MD", "moderate_dysplastic", 1, 0.45, 0.70, 1.2, 0.10, (140, 175, 205)),
    CellClass("SD", "severe_dysplastic", 1, 0.60, 0.80, 1.15, 0.14, (130, 165, 200)),
    CellClass("CIS", "carcinoma_in_situ", 1, 0.72, 0.90, 1.1, 0.20, (125, 155, 195)),
)


def _blob(cx: float, cy: float, rx: float, ry: float, angle: float, jitter: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = 1 + jitter * rng.standard_normal(8) @ np.sin(np.outer(np.arange(1, 9), t) + rng.uniform(0, 6.3, (8, 1)))
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return list(zip(cx + c * x - s * y, cy + s * x + c * y))


def draw_cell(cls: CellClass, size: int, rng: np.random.Generator) -> Image.Image:
    """One cell of class `cls` on a pale background, with random size, pose and stain variation."""
    bg = tuple(int(v) for v in rng.normal(232, 6, 3).clip(200, 255))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    radius = size * rng.uniform(0.26, 0.36)
    angle = rng.uniform(0, np.pi)
    rx, ry = radius * np.sqrt(cls.elongation), radius / np.sqrt(cls.elongation)
    cyto = tuple(int(v) for v in (np.array(cls.cytoplasm) + rng.normal(0, 10, 3)).clip(0, 255))
    draw.polygon(_blob(size / 2, size / 2, rx, ry, angle, 0.03, rng), fill=cyto)
    nr = radius * cls.nucleus * rng.uniform(0.85, 1.15)
    shade = 150 - 110 * cls.darkness + rng.normal(0, 8)
    nucleus = tuple(int(v) for v in np.clip([shade * 0.8, shade * 0.6, shade * 1.1], 0, 255))
    off = rng.normal(0, radius * 0.08, 2)
    draw.polygon(_blob(size / 2 + off[0], size / 2 + off[1], nr, nr * 0.85, angle, cls.irregular, rng), fill=nucleus)
    noise = rng.normal(0, 6, (size, size, 3))
    arr = np.asarray(im.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32) + noise
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_cells(root: str | Path, per_class: int = 40, size: int = 96, seed: int = 0) -> Path:
    """Write `per_class` cells of each class as class folders (named by code) of PNGs, plus `label_map.json`.

    Returns the root, which `open_dataset(root, label_map=root / "label_map.json")` reads as a folders layout.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        folder = root / cls.code
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_cell(cls, size, rng).save(folder / f"{cls.code.lower()}_{i:03d}.png")
    mapping = {
        "classes": [c.code for c in CLASSES],
        "binary": {c.code: c.binary for c in CLASSES},
        "names": {c.code: f"synthetic {c.name.replace('_', ' ')}" for c in CLASSES},
    }
    (root / "label_map.json").write_text(json.dumps(mapping, indent=2) + "\n")
    return root
