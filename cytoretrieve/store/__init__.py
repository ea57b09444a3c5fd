"""The store: LanceDB tables (`tables`: the base table, vector tables; `tiles`: tile tables) and the FAISS indexes
over them (`index`). The only code that writes LanceDB.

`from cytoretrieve.store import Store` is the entry point; the names below are re-exported from `tables`.
"""

from cytoretrieve.store.tables import (
    BASE_FIELDS,
    COLUMNS,
    DEFAULT_STORE,
    KEEP_VERSIONS,
    META_KEY,
    VectorTable,
    Store,
    TableInfo,
    default_store_uri,
    read_meta,
    row_key,
    table_name_for,
    table_schema,
)

__all__ = [
    "BASE_FIELDS",
    "COLUMNS",
    "VectorTable",
    "DEFAULT_STORE",
    "KEEP_VERSIONS",
    "META_KEY",
    "Store",
    "TableInfo",
    "default_store_uri",
    "read_meta",
    "row_key",
    "table_name_for",
    "table_schema",
]
