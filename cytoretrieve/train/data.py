"""Training data: where images come from (image folders, cell datasets, CSV manifests, tile tables of the
store), slide-level splits, the per-sample-seeded dataset and the resumable distributed sampler.

A source is a list of items, each an image file (a path) or a tile of a slide (a tile-table row, read with
the slide backends through `cytoretrieve.sources.slides.reader.SlideReader`, whose handles each DataLoader worker opens for
itself), with a stable id and the slide it comes from (for `--split`).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.models.preprocess import to_rgb
from cytoretrieve.sources.cells.record import accepted_endings, walk_images
from cytoretrieve.sources.cohort.split import load_split
from cytoretrieve.sources.resolve import not_a_table, resolve_source
from cytoretrieve.train.augment import CellBank, DinoViews, PasteSpec, paste_cells, to_uint8_tensor
from cytoretrieve.train.config import TrainConfig

TILE_KEYS = ("path", "x", "y", "level", "read_size", "tile_size")  # what reading a tile-table row needs
SLIDE_HANDLES = 32  # open slides per DataLoader worker: training visits slides in random order


class TrainItems:
    """Image files and / or slide tiles, with stable ids and optional slide ids. Picklable (paths and row dicts;
    the slide reader opens its handles in the process that reads)."""

    def __init__(self, items: Sequence[str | dict[str, Any]], ids: Sequence[str], slides: Sequence[str | None]) -> None:
        self.items, self.ids, self.slides = list(items), list(ids), list(slides)
        self._reader = None
        if any(isinstance(item, dict) for item in self.items):
            from cytoretrieve.sources.slides.reader import SlideReader

            self._reader = SlideReader(max_open=SLIDE_HANDLES)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        item = self.items[i]
        if isinstance(item, dict):
            return self._reader.read_row(item)
        with Image.open(item) as im:
            image = to_rgb(im)
            image.load()
        return image

    def subset(self, keep: Sequence[int]) -> TrainItems:
        return TrainItems([self.items[i] for i in keep], [self.ids[i] for i in keep], [self.slides[i] for i in keep])

    def digest(self) -> str:
        """sha256 of the ordered ids: a resumed run must see the same items in the same order."""
        h = hashlib.sha256()
        for item in self.ids:
            h.update(item.encode() + b"\n")
        return h.hexdigest()


def build_dataset(config: TrainConfig) -> tuple[TrainDataset, int]:
    """The run's training dataset (after its split) and the number of held-out slides."""
    source = open_sources(config.data, config.store)
    held_out = 0
    if config.split is not None:
        source, held_out = apply_split(source, load_split(config.split).fold_of, int(config.fold))
    bank = open_cell_bank(config.paste_cells, config.store) if config.paste_cells else None
    return TrainDataset(source, DinoViews(config.views()), config.seed, bank, config.paste() if bank else None), held_out


def open_sources(specs: Sequence[str | Path], store: str | None = None) -> TrainItems:
    """Training items from every `data` value, read by `sources.resolve` as `embed SOURCE` is: a folder (every
    image below it, recursively; the slide of an image is its top-level sub-folder), a known cell dataset folder
    (Herlev / SIPaKMeD: masks left out), a CSV manifest (path,label[,group]: group is the slide), or the name of a tile table in `store` (from
    `cytoretrieve tile`: one row per tile, its slide id). Ids are prefixed with the source's name when there
    are several sources."""
    if not specs:
        raise CytoError("no training data: pass `data` FOLDER (images, recursively), MANIFEST.csv or a tile table name")
    parts = [_open_one(str(s), store) for s in specs]
    if len(parts) == 1:
        return parts[0]
    items, ids, slides = [], [], []
    for n, (spec, part) in enumerate(zip(specs, parts)):
        prefix = f"{n}:{Path(spec).name}/"
        items += part.items
        ids += [prefix + i for i in part.ids]
        slides += part.slides
    return TrainItems(items, ids, slides)


def _open_one(spec: str, store: str | None) -> TrainItems:
    from cytoretrieve.sources.cells.herlev import looks_like_herlev
    from cytoretrieve.sources.cells.sipakmed import looks_like_sipakmed

    source = resolve_source(spec, param="data")
    if source.kind == "table":
        return _from_tile_table(source.value, store)
    if source.kind == "manifest":
        return _from_dataset(source.path, "manifest")
    if source.kind == "slide":
        raise CytoError(f"`data` {source.path} is a slide: tile it first (`cytoretrieve tile`) and pass its tile table")
    root = source.path
    if looks_like_herlev(root) or looks_like_sipakmed(root):
        return _from_dataset(root, "auto")
    files = list(walk_images(root))
    if not files:
        raise CytoError(f"no images found under {root} (accepted endings: {accepted_endings()})")
    ids = [f.relative_to(root).as_posix() for f in files]
    slides = [i.split("/", 1)[0] if "/" in i else None for i in ids]
    return TrainItems([str(f) for f in files], ids, slides)


def _from_dataset(path: Path, layout: str) -> TrainItems:
    from cytoretrieve.sources.cells import open_dataset

    records = open_dataset(path, layout=layout).records
    return TrainItems([r.path for r in records], [r.id for r in records], [r.group for r in records])


def _from_tile_table(name: str, store: str | None, param: str = "data") -> TrainItems:
    from cytoretrieve.store.tables import Store

    try:
        from cytoretrieve.store.tiles import open_tile_table
    except ImportError as e:  # openslide missing
        raise CytoError(f"reading tile table {name!r} needs the slide libraries: {e}") from e
    db = Store(store)
    if name not in db.table_names():
        raise not_a_table(name, db.uri, db.table_names(), param)
    rows = open_tile_table(db, name).rows(["id", "slide", *TILE_KEYS])
    if not rows:
        raise CytoError(f"tile table {name!r} in {db.uri} has no tiles")
    return TrainItems([{k: r[k] for k in TILE_KEYS} for r in rows], [r["id"] for r in rows], [r["slide"] for r in rows])


def open_cell_bank(specs: Sequence[str | Path], store: str | None = None) -> CellBank:
    """Labelled single cells to paste: Herlev / SIPaKMeD / class folders / CSV manifests through
    `cytoretrieve.sources.cells.open_dataset` (a Herlev mask `<stem>-d.bmp` is used when present), any folder of cell
    images, or a cell table of the store (`cytoretrieve annotations import` -> `<table>_cells`)."""
    from cytoretrieve.sources.cells import mask_path, open_dataset

    items: list[str | dict[str, Any]] = []
    masks: list[str | None] = []
    for spec in specs:
        source = resolve_source(spec, param="paste_cells")
        if source.kind == "table":
            cells = _from_tile_table(source.value, store, "paste_cells")
            items += cells.items
            masks += [None] * len(cells)
            continue
        if source.kind == "slide":
            raise CytoError(f"`paste_cells` {source.path} is a slide: pass its cell table (`cytoretrieve annotations import`)")
        path = source.path
        try:
            records = open_dataset(path).records
        except CytoError:
            if not path.is_dir():
                raise
            files = [str(f) for f in walk_images(path) if not f.stem.lower().endswith("-d")]
            if not files:
                raise CytoError(f"no cell images found under {path} for `paste_cells`") from None
            items += files
            masks += [None] * len(files)
            continue
        for record in records:
            items.append(record.path)
            m = mask_path(record)
            masks.append(str(m) if m is not None else None)
    return CellBank(items, masks)


# --- slide-level splits ----------------------------------------------------------------------------------


def apply_split(source: TrainItems, split: dict[str, int], fold: int) -> tuple[TrainItems, int]:
    """Keep the items whose slide is not in `fold`; returns (kept, number of held-out slides). Items without a
    slide, or from slides the split does not list, are refused: they could be held-out material."""
    if fold not in set(split.values()):
        raise CytoError(f"fold {fold} is not in the split file (folds: {', '.join(map(str, sorted(set(split.values()))))})")
    no_slide = sum(s is None for s in source.slides)
    if no_slide:
        raise CytoError(
            f"{no_slide} training images have no slide id, so the split cannot hold their slide out: put each"
            " slide's tiles in their own sub-folder, or use a manifest with a group column"
        )
    unknown = sorted({s for s in source.slides if s not in split})
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise CytoError(f"{len(unknown)} slides of the training data are not in the split file ({shown})")
    keep = [i for i, s in enumerate(source.slides) if split[s] != fold]
    held_out = len({s for s in source.slides if split[s] == fold})
    if not keep:
        raise CytoError(f"every training slide is in the held-out fold {fold}: nothing left to train on")
    return source.subset(keep), held_out


# --- dataset, sampler, collate -----------------------------------------------------------------------------


class TrainDataset(torch.utils.data.Dataset):
    """`dataset[(epoch, i)]` -> (views, ok). All randomness comes from a generator seeded by (seed, epoch, i).
    An unreadable image is replaced by the next readable one (ok=False tells the loop to count it)."""

    def __init__(self, source: TrainItems, views: DinoViews, seed: int,
                 bank: CellBank | None = None, paste: PasteSpec | None = None) -> None:
        self.source, self.views, self.seed = source, views, int(seed)
        self.bank, self.paste = (bank, paste) if bank is not None and len(bank) and paste and paste.p > 0 else (None, None)

    def __len__(self) -> int:
        return len(self.source)

    def sample(self, epoch: int, i: int) -> tuple[Image.Image, Image.Image, list[Image.Image], bool]:
        """(source image, image after copy-paste, views as images, ok) for the preview and __getitem__."""
        rng = np.random.default_rng([self.seed, int(epoch), int(i)])
        ok = True
        for attempt in range(len(self.source)):
            try:
                image = self.source.load((i + attempt) % len(self.source))
                break
            except Exception:  # noqa: BLE001 - a corrupt image must not kill a long run
                ok = False
        else:
            raise RuntimeError("no training image could be read")
        composite = image
        if self.bank is not None and rng.random() < self.paste.p:
            try:
                composite = paste_cells(image, self.bank, rng, self.paste)
            except Exception:  # noqa: BLE001 - an unreadable cell image: no paste this time
                ok = False
        return image, composite, self.views.images(composite, rng), ok

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], bool]:
        _, _, views, ok = self.sample(*key)
        return [to_uint8_tensor(v) for v in views], ok


def collate(items: list[tuple[list[torch.Tensor], bool]]) -> tuple[list[torch.Tensor], int]:
    """-> ([view 0 batch, view 1 batch, ...] uint8, number of replaced unreadable images)."""
    n_views = len(items[0][0])
    return [torch.stack([it[0][v] for it in items]) for v in range(n_views)], sum(not it[1] for it in items)


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's order (a permutation seeded by seed + epoch, padded to a multiple of the world size,
    every world_size-th index for this rank) yielding (epoch, index) keys, and able to start `skip_batches`
    batches into the epoch: a resumed run loads nothing it has already trained on."""

    def __init__(self, n: int, *, rank: int, world_size: int, batch_size: int, seed: int) -> None:
        self.n, self.rank, self.world_size, self.batch_size, self.seed = n, rank, world_size, batch_size, seed
        self.per_rank = math.ceil(n / world_size)
        self.batches = self.per_rank // batch_size  # drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def indices(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world_size - self.n]
        mine = order[self.rank :: self.world_size]
        return mine[self.skip * self.batch_size : self.batches * self.batch_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        return max(0, self.batches - self.skip) * self.batch_size


@dataclass
class Loader:
    """The DataLoader and its sampler; `epoch(e, skip)` iterates one (possibly resumed) epoch."""

    loader: torch.utils.data.DataLoader
    sampler: EpochSampler

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[tuple[list[torch.Tensor], int]]:
        self.sampler.set_epoch(epoch, skip_batches)
        return iter(self.loader)


def make_loader(dataset: TrainDataset, *, rank: int, world_size: int, batch_size: int, seed: int,
                workers: int, pin_memory: bool, worker_init_fn=None) -> Loader:  # noqa: ANN001
    sampler = EpochSampler(len(dataset), rank=rank, world_size=world_size, batch_size=batch_size, seed=seed)
    kwargs = {}
    if workers > 0:
        kwargs = {"persistent_workers": True, "prefetch_factor": 4, "worker_init_fn": worker_init_fn}
        if "lancedb" in sys.modules:  # its runtime threads make a forked child liable to deadlock (see embed.py)
            kwargs["multiprocessing_context"] = "forkserver"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory, drop_last=True, **kwargs,
    )
    return Loader(loader, sampler)
