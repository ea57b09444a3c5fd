"""What a table of vectors says about its vectors, read from its metadata: shared by the LanceDB table
(`tables.VectorTable`) and its snapshot (`snapshot.Snapshot`), which must not import LanceDB."""

from __future__ import annotations

from typing import Any


class VectorMeta:
    """The backbone fingerprint, the vector dimension and the dataset's label map of `self.meta`."""

    meta: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.meta["backbone"]["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.meta["backbone"]["dim"])

    @property
    def labels(self) -> dict[str, Any] | None:
        """The dataset's label map (classes, binary mapping, names) as stored, or None."""
        return self.meta.get("dataset", {}).get("labels")
