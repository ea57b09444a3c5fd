"""`train --preview N`: a PNG grid of what the model sees. One row per image: the source, the image after cell
copy-paste, then each view (global 1, global 2, local crops), all at the global crop size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:  # views draw what they are handed: the trainer's dataset is only a type here
    from cytoretrieve.train.data import TrainDataset

PAD = 4


def write_preview(dataset: TrainDataset, n: int, path: str | Path, *, size: int | None = None, epoch: int = 0) -> Path:
    """Images 0..n-1 of the training set with the views training gives them in `epoch` (same seeds, same
    copy-paste); returns the PNG's path."""
    n = max(1, min(int(n), len(dataset)))
    size = size or dataset.views.spec.image_size
    rows = [dataset.sample(epoch, i)[:3] for i in range(n)]
    n_cols = 2 + max(len(r[2]) for r in rows)
    header = 18
    grid = Image.new("RGB", (n_cols * (size + PAD) + PAD, header + n * (size + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    titles = ["source", "after copy-paste", "global 1", "global 2"] + [f"local {k + 1}" for k in range(n_cols - 4)]
    for c, title in enumerate(titles[:n_cols]):
        draw.text((PAD + c * (size + PAD), 3), title, fill=(0, 0, 0))
    for r, (source, composite, views) in enumerate(rows):
        for c, image in enumerate([source, composite, *views]):
            tile = image if image.size == (size, size) else _fit(image, size)
            grid.paste(tile, (PAD + c * (size + PAD), header + PAD + r * (size + PAD)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _fit(image: Image.Image, size: int) -> Image.Image:
    scale = size / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return canvas
