"""The embedding job: images -> backbone -> vectors, written to a store table in large, resumable batches.

Resuming is by row id: a job first reads the ids the table already holds and embeds only the rest, so a rerun
after Ctrl-C or kill -9 finishes the work, and a rerun of a finished job adds nothing. Each flush is one LanceDB
commit, and a killed commit leaves only whole batches behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cytoretrieve.backbones import Backbone, Preprocessing, resolve_device
from cytoretrieve.datasets import CellDataset, CellRecord, open_dataset
from cytoretrieve.store import CellTable, Store, table_name_for

FLUSH_ROWS = 2048  # rows per LanceDB commit
FLUSH_SECONDS = 30.0  # ... or sooner, so a kill loses at most this much work


def default_workers() -> int:
    """Decoding is cheap next to the forward pass: leave most cores to torch."""
    return min(8, max(1, (os.cpu_count() or 2) // 2))


@dataclass
class EmbedReport:
    """What a job did: `added` new rows, `skipped` already stored, `failed` (id, reason) unreadable images."""

    table: str
    total: int
    skipped: int
    added: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


class ImageRecords(torch.utils.data.Dataset):
    """Opens and preprocesses cell images in DataLoader workers; an unreadable image yields its error instead."""

    def __init__(self, records: Sequence[CellRecord], preprocessing: Preprocessing) -> None:
        self.records = list(records)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, bytes | None, str | None]:
        try:
            with Image.open(self.records[i].path) as im:
                im.load()
                return i, self.preprocessing(im), self.preprocessing.thumbnail(im), None
        except Exception as e:  # noqa: BLE001 - any decoding failure skips this one image, not the job
            return i, None, None, f"{type(e).__name__}: {e}".splitlines()[0]


def _collate(items: list[tuple[int, Any, Any, Any]]) -> tuple[list[int], torch.Tensor | None, list[bytes], list[tuple[int, str]]]:
    good = [it for it in items if it[3] is None]
    bad = [(it[0], it[3]) for it in items if it[3] is not None]
    tensor = torch.stack([it[1] for it in good]) if good else None
    return [it[0] for it in good], tensor, [it[2] for it in good], bad


def _is_cnn(model: torch.nn.Module) -> bool:
    """CNNs gain from channels_last; a ViT has a single conv (its patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def prepare(backbone: Backbone, device: str) -> torch.nn.Module:
    """Move the model to `device` in eval mode, channels_last for CNNs."""
    model = backbone.model.to(device).eval()
    if _is_cnn(model):
        model = model.to(memory_format=torch.channels_last)
    return model


def forward(model: torch.nn.Module, batch: torch.Tensor, device: str) -> np.ndarray:
    """Embed one preprocessed batch: inference_mode, channels_last for CNNs, bf16 autocast on CUDA only."""
    batch = batch.to(device, non_blocking=True)
    if _is_cnn(model):
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        out = model(batch)
    return out.float().cpu().numpy()


def embed_images(backbone: Backbone, images: Sequence[Image.Image], device: str = "cpu") -> np.ndarray:
    """Embed PIL images directly (query images for `search`)."""
    device = resolve_device(device)
    model = prepare(backbone, device)
    return forward(model, torch.stack([backbone.preprocessing(im) for im in images]), device)


def _cell_row(record: CellRecord, dataset: str, thumbnail: bytes) -> dict[str, Any]:
    return {
        "id": record.id,
        "dataset": dataset,
        "path": record.path,
        "label": record.label,
        "binary": record.binary,
        "group": record.group,
        "thumbnail": thumbnail,
    }


def embed_records(
    records: Sequence[CellRecord],
    dataset: str,
    backbone: Backbone,
    table: CellTable,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    commit_rows: int = FLUSH_ROWS,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> EmbedReport:
    """Embed the records the table does not hold yet; `on_progress(done, todo, failed)` is called after each batch."""
    start = time.perf_counter()
    have = table.ids()
    todo = [r for r in records if r.id not in have]
    report = EmbedReport(table=table.name, total=len(records), skipped=len(records) - len(todo))
    if not todo:
        return report
    if on_progress:
        on_progress(0, len(todo), 0)
    device = resolve_device(device)
    model = prepare(backbone, device)
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(
        ImageRecords(todo, backbone.preprocessing),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.startswith("cuda"),
        # forkserver, not fork: LanceDB's runtime threads make a forked child liable to deadlock
        multiprocessing_context="forkserver" if workers > 0 else None,
    )
    rows: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if rows:
            table.add(table.make_rows(rows, np.concatenate(vectors)))
            report.added += len(rows)
            rows.clear()
            vectors.clear()
        last_flush = time.monotonic()

    try:
        for idx, batch, thumbs, bad in loader:
            report.failed.extend((todo[i].id, reason) for i, reason in bad)
            if batch is not None:
                vectors.append(forward(model, batch, device))
                rows.extend(_cell_row(todo[i], dataset, t) for i, t in zip(idx, thumbs))
            if len(rows) >= commit_rows or time.monotonic() - last_flush > FLUSH_SECONDS:
                flush()
            if on_progress:
                on_progress(report.added + len(rows) + len(report.failed), len(todo), len(report.failed))
        flush()
    except KeyboardInterrupt:
        flush()  # keep what was embedded: the rerun resumes from here
        report.interrupted = True
    if report.added:
        table.finish()
    report.seconds = time.perf_counter() - start
    return report


def embed(
    source: str | Path,
    backbone: Backbone,
    store: Store | None = None,
    *,
    table: str | None = None,
    layout: str = "auto",
    label_map: str | Path | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    commit_rows: int = FLUSH_ROWS,
    on_progress: Callable[[int, int, int], None] | None = None,
    on_start: Callable[[CellDataset, CellTable], None] | None = None,
) -> EmbedReport:
    """Embed a cell dataset (Herlev, SIPaKMeD, class folders, CSV manifest) into a table of the store.

    The table defaults to `<dataset>_<arch>`; it records the backbone, so appending another backbone's vectors
    to it is refused.
    """
    dataset = open_dataset(source, layout=layout, label_map=label_map)
    store = store or Store()
    name = table or table_name_for(dataset.name, backbone.arch)
    dataset_meta = {
        "name": dataset.name,
        "layout": dataset.layout,
        "root": str(dataset.root),
        "labels": dataset.labels.to_dict() if dataset.labels else None,
    }
    cell_table = store.create_or_open(name, backbone.metadata(), dataset_meta)
    if on_start:
        on_start(dataset, cell_table)
    return embed_records(
        dataset.records,
        dataset.name,
        backbone,
        cell_table,
        batch_size=batch_size,
        workers=workers,
        device=device,
        commit_rows=commit_rows,
        on_progress=on_progress,
    )
