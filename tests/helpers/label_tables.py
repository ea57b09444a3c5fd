"""A small vector table for the label-log tests: 3 classes (A negative, B and C positive) of 10 rows each, clustered
around three axes of an 8-d space, with the label map recorded as `embed` records it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cytoretrieve.store.tables import Store

TABLE = "toy_r18"
LABEL_MAP = {"classes": ["A", "B", "C"], "binary": {"A": 0, "B": 1, "C": 1}, "names": {}}
DIM = 8


def toy_table(store: Store, name: str = TABLE, per_class: int = 10, seed: int = 0, slides: bool = False) -> str:
    rng = np.random.default_rng(seed)
    table = store.create_or_open(name, {"arch": "resnet18", "fingerprint": "f" * 64, "dim": DIM},
                                 {"name": "toy", "labels": LABEL_MAP})
    records, vectors = [], []
    for c, label in enumerate(LABEL_MAP["classes"]):
        for i in range(per_class):
            row = {"id": f"{label}/{i}", "label": label, "binary": LABEL_MAP["binary"][label]}
            if slides:
                row |= {"id": f"s{c}@{i * 64},0,64", "slide": f"s{c}", "x": i * 64, "y": 0, "tile_size": 64}
            records.append(row)
            vectors.append(np.eye(DIM)[c] + 0.1 * rng.standard_normal(DIM))
    table.add(table.make_rows(records, np.array(vectors, np.float32)))
    if table.lease is not None:
        table.lease.release()
    return name


def toy_store(folder: Path) -> Store:
    """A store in `folder`/store holding the toy table: the label-log tests' `store` fixture."""
    store = Store(folder / "store")
    toy_table(store)
    return store
