"""Slide overviews: one small picture per slide, stored when the slide is tiled, so that views (heat maps, the
viewer's slide map) never reopen a slide file.

One store-wide table, `slide_overviews` (kind `overviews`), one row per slide id: the slide's level-0 size and
pixel size, the overview image (JPEG) and its downsample (level-0 px per overview px). Re-tiling a slide
replaces its row (merge on `slide`), so each slide is stored once.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from cytoretrieve.store.filters import one_of
from cytoretrieve.store.tables import META_KEY, Store, retry_commit

if TYPE_CHECKING:
    from PIL import Image

OVERVIEWS_TABLE = "slide_overviews"
OVERVIEWS_KIND = "overviews"
LONG_SIDE = 1024  # px on the overview's long side at most
FIELDS = [
    pa.field("slide", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("width", pa.int64()),  # level-0 px
    pa.field("height", pa.int64()),
    pa.field("mpp", pa.float32()),  # level-0 um/px (null when unknown)
    pa.field("downsample", pa.float32()),  # level-0 px per overview px
    pa.field("image", pa.binary()),  # JPEG
]


@dataclass(frozen=True)
class Overview:
    """A slide's overview picture and where it sits: overview px * `downsample` = level-0 px."""

    slide: str
    path: str
    width: int
    height: int
    mpp: float | None
    downsample: float
    image: bytes

    def picture(self) -> Image.Image:
        from PIL import Image

        return Image.open(io.BytesIO(self.image)).convert("RGB")


def make_overview(slide: str, path: str, width: int, height: int, mpp: float | None, thumbnail: np.ndarray,
                  downsample: float) -> Overview:
    """An overview from a thumbnail (uint8 (h, w, 3), `downsample` level-0 px per px), shrunk to `LONG_SIDE`."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3]))
    scale = min(1.0, LONG_SIDE / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)  # 4:4:4: stain colours kept
    return Overview(slide, path, int(width), int(height), mpp, float(downsample) * (thumbnail.shape[1] / img.width),
                    buf.getvalue())


def write_overviews(store: Store, overviews: Sequence[Overview]) -> None:
    """Store these overviews, replacing any earlier row of the same slide (one commit)."""
    if not overviews:
        return
    schema = pa.schema(FIELDS, metadata={META_KEY: json.dumps({"kind": OVERVIEWS_KIND}).encode()})
    rows = pa.Table.from_pylist([o.__dict__ for o in overviews], schema=schema)
    tbl = store.db.create_table(OVERVIEWS_TABLE, schema=schema, exist_ok=True)
    retry_commit(lambda: tbl.merge_insert("slide").when_matched_update_all().when_not_matched_insert_all()
                 .execute(rows))


def read_overviews(store: Store, slides: Iterable[str]) -> dict[str, Overview]:
    """{slide: overview} for the slides that have one (a store tiled before overviews were stored has none)."""
    wanted = sorted(set(slides))
    if not wanted or OVERVIEWS_TABLE not in store.table_names():
        return {}
    tbl = store.db.open_table(OVERVIEWS_TABLE)
    found: dict[str, Overview] = {}
    for start in range(0, len(wanted), 500):
        part = wanted[start:start + 500]
        where = one_of("slide", part)
        for row in tbl.search().where(where).limit(None).to_arrow().to_pylist():
            found[row["slide"]] = Overview(**{f.name: row[f.name] for f in FIELDS})
    return found


def read_overview(store: Store, slide: str) -> Overview | None:
    """One slide's overview, or None."""
    return read_overviews(store, [slide]).get(slide)
