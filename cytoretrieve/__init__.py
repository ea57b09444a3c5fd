"""cytoretrieve: Pap-smear cytology images to a searchable embedding store.

Light on purpose: importing the package (and `cytoretrieve --help`) loads no torch, timm, lancedb or sklearn.
The main functions are here, imported on first use (`cytoretrieve.open_store`, `load_backbone`, `embed`,
`classify`, `transfer`, `search`, `score`; examples in `cytoretrieve.api`); the rest lives in the pipeline's
folders: `sources`, `models`, `jobs`, `store`, `queries`, `views`, `train`.
"""

from __future__ import annotations

from typing import Any

from cytoretrieve.version import __version__ as __version__  # re-exported: `cytoretrieve.__version__`

_API = ("open_store", "load_backbone", "embed", "classify", "transfer", "search", "score")


def __getattr__(name: str) -> Any:
    if name in _API:
        from cytoretrieve import api

        return getattr(api, name)
    raise AttributeError(f"module 'cytoretrieve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
