"""The store: LanceDB tables (`tables`: the base table, vector tables; `tiles`: tile and cell tables; `overviews`:
one picture per slide), row filters (`filters`: the one SQL quoting), the FAISS toolkit and index kinds (`ann`),
a table's cached index (`index`), the label log (`labels`), the viewer's 2-D maps (`maps`), saved tile scores
(`scores`), what `tables` shows without LanceDB (`summary`) and a small table's rows read without it (`snapshot`).
The only code that touches LanceDB.

`from cytoretrieve.store import Store` is the entry point; the names below are re-exported from `tables`, loaded
on first use so that `import cytoretrieve.store.index` does not pull in lancedb.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BASE_FIELDS",
    "COLUMNS",
    "DEFAULT_STORE",
    "KEEP_VERSIONS",
    "META_KEY",
    "Store",
    "Table",
    "TableInfo",
    "VectorTable",
    "default_store_uri",
    "read_meta",
    "row_key",
    "table_name_for",
    "table_schema",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cytoretrieve.store import tables

        return getattr(tables, name)
    raise AttributeError(f"module 'cytoretrieve.store' has no attribute {name!r}")
