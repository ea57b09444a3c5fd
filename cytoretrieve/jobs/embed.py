"""The embedding job: images -> backbone -> vectors, written to a store table in large, resumable batches.

Resuming is by row id: a job first reads the ids the table already holds and embeds only the rest, so a rerun
after Ctrl-C or kill -9 finishes the work, and a rerun of a finished job adds nothing. Each flush is one LanceDB
commit, and a killed commit leaves only whole batches behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cytoretrieve.distributed import barrier, rank_world, shard
from cytoretrieve.errors import CytoError
from cytoretrieve.ids import slide_id
from cytoretrieve.models.backbones import Backbone, with_stain
from cytoretrieve.models.inference import forward, prepare
from cytoretrieve.models.preprocess import ImageFiles, collate_images
from cytoretrieve.models.stain import NONE
from cytoretrieve.runtime import default_workers, resolve_device
from cytoretrieve.sources.cells import CellRecord, open_dataset
from cytoretrieve.sources.resolve import Source, not_a_table, resolve_source
from cytoretrieve.store.tables import Store, VectorTable, table_name_for

FLUSH_ROWS = 2048  # rows per LanceDB commit
FLUSH_SECONDS = 30.0  # ... or sooner, so a kill loses at most this much work


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


def _cell_row(record: CellRecord, dataset: str) -> dict[str, Any]:
    return {
        "id": record.id,
        "dataset": dataset,
        "path": record.path,
        "label": record.label,
        "binary": record.binary,
        "group": record.group,
    }


def embed_rows(
    rows: Sequence[dict[str, Any]],
    backbone: Backbone,
    table: VectorTable,
    *,
    load: Callable[[dict[str, Any]], Image.Image] | None = None,
    shard_key: str = "id",
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    commit_rows: int = FLUSH_ROWS,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> EmbedReport:
    """Embed the rows the table does not hold yet and append them with their vectors and thumbnails.

    `rows` carry the table's metadata columns (`id`, `path`, `label`, ...); `load(row)` gives the image (default:
    open `row["path"]`). Under torchrun each process takes the rows whose `shard_key` hashes to its rank.
    `on_progress(done, todo, failed)` is called after each batch.
    """
    start = time.perf_counter()
    rows = shard(rows, lambda r: str(r[shard_key]))
    have = table.ids()
    todo = [r for r in rows if r["id"] not in have]
    report = EmbedReport(table=table.name, total=len(rows), skipped=len(rows) - len(todo))
    if todo:
        _run(todo, load, backbone, table, report, batch_size, workers, device, commit_rows, on_progress)
    barrier()  # every process has committed its rows before one compacts the table
    if rank_world()[0] == 0 and (report.added or rank_world()[1] > 1):
        table.finish()
        if not report.interrupted:  # the first `classify` of the table then skips importing LanceDB
            from cytoretrieve.queries.labelled_snapshot import keep

            keep(table)
    if rank_world()[0] == 0:  # `tables` shows a stopped run's table as interrupted until a run finishes it
        table.store.mark_interrupted(table.name, report.interrupted)
    report.seconds = time.perf_counter() - start
    return report


def _run(
    todo: list[dict[str, Any]],
    load: Callable[[dict[str, Any]], Image.Image] | None,
    backbone: Backbone,
    table: VectorTable,
    report: EmbedReport,
    batch_size: int,
    workers: int | None,
    device: str,
    commit_rows: int,
    on_progress: Callable[[int, int, int], None] | None,
) -> None:
    """The loop: DataLoader workers decode, the model embeds, rows are committed every `commit_rows` or 30 s."""
    if on_progress:
        on_progress(0, len(todo), 0)
    device = resolve_device(device)
    model = prepare(backbone, device)
    workers = default_workers(device) if workers is None else workers
    items = [r["path"] for r in todo] if load is None else todo
    loader = torch.utils.data.DataLoader(
        ImageFiles(items, backbone.preprocessing, load),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_images,
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
            report.failed.extend((todo[i]["id"], reason) for i, reason in bad)
            if batch is not None:
                vectors.append(forward(model, batch, device))
                rows.extend({**todo[i], "thumbnail": t} for i, t in zip(idx, thumbs))
            if len(rows) >= commit_rows or time.monotonic() - last_flush > FLUSH_SECONDS:
                flush()
            if on_progress:
                on_progress(report.added + len(rows) + len(report.failed), len(todo), len(report.failed))
        flush()
    except KeyboardInterrupt:
        flush()  # keep what was embedded: the rerun resumes from here
        report.interrupted = True


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
    on_start: Callable[[str, int, VectorTable], None] | None = None,
    plane: int | str | None = None,
    stain: str | None = None,
    stain_target: str | Path | Sequence[float] | None = None,
) -> EmbedReport:
    """Embed a cell dataset (Herlev, SIPaKMeD, class folders, CSV manifest) or slide tiles into a store table.

    SOURCE (read by `sources.resolve`, as `train --data` is) is a dataset folder or CSV manifest, the name of a
    tile table of the store (`cytoretrieve tile` writes those), or one slide file, which is first tiled as
    `cytoretrieve tile` does by default into the tile table `<slide>_tiles`. The table defaults to
    `<dataset>_<arch>` (`<tiles>_<arch>`); it records the backbone, so appending another backbone's vectors to it
    is refused. `on_start(description, images, table)` is called once the source is read.

    `plane` (slides and tile tables of multi-plane scans: N, best, edf; see `sources.slides.planes`) reads every
    tile from that focal plane setting instead of the plane its row records; the vector table records it, and
    vectors of another plane setting are never appended to it.

    `stain` (none, macenko, reinhard: `models.stain`; None keeps the backbone's) normalises every image's stain
    before the model sees it, onto `stain_target` (numbers, an image file to fit on, or None for the shipped
    default). It enters the backbone's preprocessing and fingerprint, so a table holds one normalisation, the
    default table name gets the normaliser as a suffix (`herlev_resnet18_macenko`), and `search` normalises a
    query image the same way. Grey images are refused with a normaliser (embed them with `stain` none).
    """
    store = store or Store()
    if stain is not None or stain_target is not None:
        backbone = with_stain(backbone, stain if stain is not None else backbone.preprocessing.stain, stain_target)
    job = _job(resolve_source(source), backbone, store, table, layout, label_map, plane)
    if on_start:
        on_start(job.description, len(job.rows), job.table)
    return embed_rows(job.rows, backbone, job.table, load=job.load, shard_key=job.shard_key, batch_size=batch_size,
                      workers=workers, device=device, commit_rows=commit_rows, on_progress=on_progress)


@dataclass
class _Job:
    """What to embed (rows with the table's metadata columns, how to load each image) and into which table."""

    description: str
    rows: list[dict[str, Any]]
    table: VectorTable
    load: Callable[[dict[str, Any]], Image.Image] | None = None
    shard_key: str = "id"  # under torchrun, rows are sharded over the processes by this column


def _job(source: Source, backbone: Backbone, store: Store, table: str | None, layout: str,
         label_map: str | Path | None, plane: int | str | None = None) -> _Job:
    from cytoretrieve.sources.slides.planes import parse_plane

    plane = parse_plane(plane)
    if source.kind == "slide":
        return _tiles_job(tile_with_defaults(source.path, store, plane), backbone, store, table)
    if source.kind == "table":
        if source.value not in store.table_names():
            raise not_a_table(source.value, store.uri, store.table_names())
        return _tiles_job(source.value, backbone, store, table, plane)
    if plane is not None:
        raise CytoError("`plane` applies to slides and tile tables (focal planes of a scan), not to a cell dataset")
    return _cells_job(source.path, backbone, store, table, layout, label_map)


def _cells_job(path: Path, backbone: Backbone, store: Store, table: str | None, layout: str,
               label_map: str | Path | None) -> _Job:
    dataset = open_dataset(path, layout=layout, label_map=label_map)
    dataset_meta = {
        "name": dataset.name,
        "layout": dataset.layout,
        "root": str(dataset.root),
        "labels": dataset.labels.to_dict() if dataset.labels else None,
    }
    name = table or default_table_name(dataset.name, backbone)
    check_stain_of(store, name, backbone)
    if backbone.preprocessing.stain != NONE and dataset.records:
        refuse_grey(dataset.records[0].path, backbone)
    cell_table = store.create_or_open(name, backbone.metadata(), dataset_meta)
    return _Job(f"{dataset.name} ({dataset.layout})", [_cell_row(r, dataset.name) for r in dataset.records], cell_table)


def _tiles_job(tiles: str, backbone: Backbone, store: Store, table: str | None, plane: int | str | None = None) -> _Job:
    """The tiles of a tile table (regions read from their slides in the workers) into `<tiles>_<arch>`. Vector
    rows keep the tile's slide id and level-0 location; under torchrun, slides are sharded over processes.
    `plane` (parsed) overrides the plane each row records; the vector table's `dataset.plane` records the
    setting (the tile table's own when None), and a table of another setting is refused."""
    from functools import partial

    from cytoretrieve.sources.slides.planes import EDF
    from cytoretrieve.sources.slides.reader import SlideReader
    from cytoretrieve.store.tiles import SHARED_COLUMNS, open_tile_table

    tile_table = open_tile_table(store, tiles)
    extra = tile_table.extra_fields  # a cell table's measurements (and focus, plane) travel with its vectors
    rows = tile_table.rows([*SHARED_COLUMNS, "read_size", *(f.name for f in extra)])
    setting = tile_table.meta.get("plane") if plane is None else plane
    if plane is not None:  # the row's plane column says what the vector was made from
        for r in rows:
            r["plane"] = EDF if plane == "edf" else (None if plane == "best" else plane)
    dataset_meta = {"name": tiles, "layout": "cells" if tile_table.cells else "tiles", "tiles": tile_table.meta,
                    "labels": None, "plane": setting}
    name = table or default_table_name(tiles, backbone)
    check_stain_of(store, name, backbone)
    grey = sum(1 for r in rows if r.get("grey"))
    if grey and backbone.preprocessing.stain != NONE:
        raise CytoError(f"`stain` {backbone.preprocessing.stain} needs colour, and {grey} of the {len(rows)} rows of "
                        f"'{tiles}' come from grey images: embed grey tiles with `stain` none")
    vector_table = store.create_or_open(name, backbone.metadata(), dataset_meta, extra=extra)
    have = vector_table.meta.get("dataset", {}).get("plane")
    if have != setting:
        vector_table.lease.release()
        raise CytoError(f"table '{vector_table.name}' holds vectors read with focal plane setting {have or 'default'}, "
                        f"not {setting or 'default'}: pass another `table`")
    what = "cell table" if tile_table.cells else "tile table"
    description = f"{what} {tiles} ({len({r['slide'] for r in rows})} slides)"
    load = SlideReader().read_row if plane is None else partial(SlideReader().read_row, plane=plane)
    return _Job(description, rows, vector_table, load=load, shard_key="slide")


def default_table_name(dataset: str, backbone: Backbone) -> str:
    """`<dataset>_<arch>`, plus `_<stain>` when the backbone normalises stain (`herlev_resnet18_macenko`)."""
    stain = backbone.preprocessing.stain
    return table_name_for(dataset, backbone.arch if stain == NONE else f"{backbone.arch}_{stain}")


def stain_of(preprocessing: dict[str, Any] | None) -> str:
    """The stain normaliser a table's stored preprocessing names (none when it has none)."""
    stain = (preprocessing or {}).get("stain")
    return str(stain.get("method", NONE)) if isinstance(stain, dict) else NONE


def check_stain_of(store: Store, name: str, backbone: Backbone) -> None:
    """Refuse, in one line, to append vectors of one stain normalisation to a table of another (the fingerprint
    check would refuse too, but only by hash)."""
    if name not in store.table_names():
        return
    stored = store.open(name).meta.get("backbone") or {}
    have, want = stain_of(stored.get("preprocessing")), backbone.preprocessing.stain
    if have != want:
        raise CytoError(f"table '{name}' holds vectors embedded with `stain` {have}, not {want}: "
                        f"embed with `stain` {have} or pass another `table`")
    target = (stored.get("preprocessing") or {}).get("stain", {}).get("target") if have != NONE else None
    if target is not None and tuple(float(v) for v in target) != backbone.preprocessing.stain_target:
        raise CytoError(f"table '{name}' holds vectors normalised with `stain` {have} onto another target: "
                        "use the table's `stain_target` or pass another `table`")


def refuse_grey(path: str | Path, backbone: Backbone) -> None:
    """A CytoError before any work when the dataset's first image is grey and the backbone normalises stain."""
    from cytoretrieve.models.preprocess import to_rgb
    from cytoretrieve.models.stain import GreyImageError, cached_normaliser

    pre = backbone.preprocessing
    try:
        with Image.open(path) as im:
            rgb = np.asarray(to_rgb(im))
    except OSError:
        return  # an unreadable image is reported by the job, with the others
    try:
        cached_normaliser(pre.stain, pre.stain_target).apply(rgb)
    except GreyImageError as e:
        raise CytoError(f"{path}: {e}") from e


def tile_with_defaults(slide: Path, store: Store, plane: int | str | None = None) -> str:
    """Tile one slide into `<slide>_tiles` through the one tiler, `cytoretrieve.jobs.tile.tile_slides`, with the
    tiler's own defaults (what `cytoretrieve tile SLIDE` does; `plane`: its focal plane setting), so the two
    cannot drift; that table's name."""
    from cytoretrieve.jobs.tile import tile_slides

    name = table_name_for(slide_id(slide), "tiles")
    report = tile_slides([slide], store, table=name, plane=plane)
    skipped = [r for r in report.results if r.status == "skipped"]
    if skipped:
        raise CytoError(f"cannot tile {slide}: {skipped[0].reason} (use `cytoretrieve tile` for its options)")
    return name
