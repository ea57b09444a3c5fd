"""The `import h5` job: a folder of CLAM / TRIDENT patch feature files -> one vector table (one row per patch).

Every file is checked first (`sources.features.inspect_folder`: datasets, lengths, one dimension, one encoder,
finite vectors), so a bad file stops the import before any row is written. Then each slide is read and written
in one commit (streamed: one slide in memory at a time); a rerun skips the slides the table already holds.

The table's backbone metadata says its vectors come from outside (`external_backbone`): the encoder's name, the
dimension and a fingerprint of both, so the usual rule holds (one table, one encoder; another encoder's files are
refused) and queries that read only the store (classify, transfer, score, search by id) work unchanged, while
search by image says it needs that encoder.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cohort.labels import SlideLabel, read_labels
from cytoretrieve.sources.features import FeatureFile, geometry_meta, inspect_folder, read_patches
from cytoretrieve.store.tables import Store, VectorTable

EXTERNAL = "external"  # the `weights` of a backbone that is not a model cytoretrieve can build


def external_backbone(encoder: str, dim: int, source: str) -> dict[str, Any]:
    """Backbone metadata for vectors made elsewhere: deterministic, so every import of one encoder matches."""
    digest = hashlib.sha256(f"external|{encoder}|{dim}".encode()).hexdigest()
    return {"arch": encoder, "weights": EXTERNAL, "fingerprint": digest, "dim": dim, "preprocessing": None,
            "external": {"source": source}}


@dataclass
class ImportReport:
    table: str
    store: str
    encoder: str
    dim: int
    slides: int = 0
    skipped: int = 0  # already in the table
    rows: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": round(self.rows_per_second, 1)}


def _slide_files(slides: str | Path | None) -> dict[str, tuple[str, float | None]]:
    """{slide id: (absolute path, level-0 mpp or None)} of the slide files in a folder (None: no folder)."""
    if slides is None:
        return {}
    from cytoretrieve.ids import slide_id
    from cytoretrieve.sources.cohort.labels import expand_slides

    out: dict[str, tuple[str, float | None]] = {}
    for path in expand_slides([slides]):
        out[slide_id(path)] = (str(path.absolute()), _slide_mpp(path))
    return out


def _slide_mpp(path: Path) -> float | None:
    """The slide's level-0 mpp from its own metadata (any slide backend), None when it has none or is unreadable."""
    from cytoretrieve.sources.slides.backends import open_slide_file
    from cytoretrieve.sources.slides.reader import resolve_mpp

    try:
        with open_slide_file(path) as backend:
            return float(resolve_mpp(backend.mpp, power=backend.objective)[0])
    except (OSError, ValueError, CytoError):
        return None


def _labels_for(files: list[FeatureFile], labels: str | Path | None) -> dict[str, SlideLabel]:
    if labels is None:
        return {}
    by_slide = read_labels(labels)
    have = {ff.slide for ff in files}
    unknown = sorted(set(by_slide) - have)
    if unknown:
        raise CytoError(f"`labels` {labels} names {len(unknown)} slide(s) without a feature file: {', '.join(unknown[:5])}")
    return by_slide


def import_h5(
    folder: str | Path,
    store: Store,
    table: str,
    *,
    layout: str = "auto",
    encoder: str | None = None,
    slides: str | Path | None = None,
    labels: str | Path | None = None,
    patches: str | Path | None = None,
) -> ImportReport:
    """Import a folder of per-slide feature files into vector table `table` (created if needed)."""
    start = time.perf_counter()
    files, notes, name = inspect_folder(folder, layout=layout, patches=patches, encoder=encoder)
    slide_labels = _labels_for(files, labels)
    slide_files = _slide_files(slides)
    dim = files[0].dim
    dataset_meta = {"name": table, "layout": "h5", "folder": str(Path(folder).absolute()),
                    "h5": {"layout": files[0].layout if len({f.layout for f in files}) == 1 else "mixed",
                           "slides": geometry_meta(files)}, "labels": None}
    vector_table = store.create_or_open(table, external_backbone(name, dim, f"h5:{files[0].layout}"), dataset_meta)
    done = _stored_slides(vector_table)
    report = ImportReport(table, store.uri, name, dim, notes=notes)
    missing_slides = 0
    for ff in files:
        if ff.slide in done:
            report.skipped += 1
            continue
        path, mpp = slide_files.get(ff.slide, (None, None))
        missing_slides += bool(slide_files) and path is None
        rows, vectors = read_patches(ff, dataset=table, label=slide_labels.get(ff.slide), slide_path=path, slide_mpp=mpp)
        vector_table.add(vector_table.make_rows(rows, vectors))
        report.slides += 1
        report.rows += len(rows)
    if missing_slides:
        report.notes.append(f"{missing_slides} slide(s) have no slide file in {slides}: their rows have no path")
    if report.slides:
        vector_table.finish()  # compacts, indexes and releases the write lease
    elif vector_table.lease is not None:
        vector_table.lease.release()
    report.seconds = time.perf_counter() - start
    return report


def _stored_slides(table: VectorTable) -> set[str]:
    if not table.count():
        return set()
    import pyarrow.compute as pc

    return set(pc.unique(table.read(["slide"]).column("slide")).to_pylist())
