"""The Python API in one place: what the CLI's main commands do, as functions that return data.

Each function imports what it needs when called, so `import cytoretrieve` stays light. The examples run as
doctests in CI (`tests/test_api.py`), on synthetic cells in a temporary store, with a small random-weight model:

    >>> import tempfile, cytoretrieve
    >>> from cytoretrieve.sources.cells.synthetic import make_cells
    >>> folder = tempfile.mkdtemp()
    >>> _ = make_cells(f"{folder}/cells", per_class=8, seed=0)
    >>> store = cytoretrieve.open_store(f"{folder}/indexes")
    >>> model = cytoretrieve.load_backbone("resnet18", "random", image_size=64)
    >>> report = cytoretrieve.embed(f"{folder}/cells", model, store, label_map=f"{folder}/cells/label_map.json",
    ...                             workers=0)
    >>> report.added
    56
    >>> table = store.open(report.table)
    >>> result = cytoretrieve.classify(table, runs=2, ks=[1, 5])
    >>> sorted(result.classes)[:2], result.n_test
    (['CIS', 'LD'], 14)
    >>> first = table.vectors(["id"])[1].column("id")[0].as_py()
    >>> hits = cytoretrieve.search(table, row_id=first, k=3)
    >>> len(hits.hits), first in {h.id for h in hits.hits}
    (3, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cytoretrieve.jobs.embed import EmbedReport
    from cytoretrieve.models.backbones import Backbone
    from cytoretrieve.queries.knn import ClassifyResult
    from cytoretrieve.queries.search import SearchResult
    from cytoretrieve.queries.transfer import TransferResult
    from cytoretrieve.store.tables import Store, VectorTable

__all__ = ["open_store", "load_backbone", "embed", "classify", "transfer", "search", "score"]


def open_store(uri: str | Path | None = None) -> Store:
    """The store at `uri` (a folder, or `s3://bucket/path`); the default is `indexes/` (or $CYTORETRIEVE_STORE)."""
    from cytoretrieve.store.tables import Store

    return Store(uri)


def load_backbone(arch: str | None, weights: str | None = "timm", *, image_size: int | None = None,
                  device: str = "cpu") -> Backbone:
    """A timm backbone with weights "timm" (downloaded once), "random" (offline) or from a file (a checkpoint,
    safetensors, or `hf-hub:` / `local-dir:` foundation models)."""
    from cytoretrieve.models.backbones import load_backbone as load

    return load(arch, weights, image_size=image_size, device=device)


def embed(source: str | Path, backbone: Backbone, store: Store | None = None, **kwargs: Any) -> EmbedReport:
    """Embed a cell dataset folder, CSV manifest, tile table or slide into a table (resumable; see
    `cytoretrieve.jobs.embed.embed` for the options)."""
    from cytoretrieve.jobs.embed import embed as run

    return run(source, backbone, store, **kwargs)


def classify(table: VectorTable, **kwargs: Any) -> ClassifyResult:
    """The k-NN protocol on a table's stored vectors and labels: weighted F1 per k over random splits."""
    from cytoretrieve.queries.knn import classify_table

    return classify_table(table, **kwargs)


def transfer(support: Sequence[VectorTable], target: VectorTable, **kwargs: Any) -> TransferResult:
    """Cross-dataset transfer: k-NN on the support tables' binary labels, scored on the target table."""
    from cytoretrieve.queries.transfer import transfer as run

    return run(support, target, **kwargs)


def search(table: VectorTable, **kwargs: Any) -> SearchResult:
    """The nearest stored rows to an image (`image=`) or a stored row (`row_id=`), optionally filtered."""
    from cytoretrieve.queries.search import search as run

    return run(table, **kwargs)


def score(store: Store, table: str, labels: str | Path, split: str | Path, **kwargs: Any) -> Any:
    """Slide-level scoring (MIL) of a tile or cell table over the folds of a split, out of fold: (result, bags,
    table)."""
    from cytoretrieve.queries.mil.score import score_table

    return score_table(store, table, labels, split, **kwargs)
