"""`cytoretrieve score` as a function: a store table's bags cross-validated over a split file's folds.

`score_table` hands back the table and the bags it opened with the result, so that outputs (heat maps, GeoJSON,
top tiles) read them without opening the table again, and the split is checked once (by `cross_validate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil.bags import Bags
from cytoretrieve.queries.mil.evaluate import CVResult, cross_validate
from cytoretrieve.queries.mil.methods import DEFAULT_METHOD, METHODS, get_method

if TYPE_CHECKING:
    from cytoretrieve.sources.cohort.split import Split
    from cytoretrieve.store.tables import Store, VectorTable


class Scored(NamedTuple):
    result: CVResult
    bags: Bags
    table: VectorTable  # the tile table the bags were read from


def score_table(store: Store | str | Path, tiles: str, labels: str | Path, split: Split | str | Path,
                method: str = DEFAULT_METHOD, *, group_column: str = "slide", train_config: Any = None,  # noqa: ANN401
                retrieval_config: Any = None, positives_table: str | None = None,  # noqa: ANN401
                stream: bool | None = None, row_labels: str = "stored", where: str | None = None) -> Scored:
    """Bags of table `tiles` (grouped by `group_column`, labelled by the labels CSV `labels`), cross-validated
    with `method` (a name of `methods.METHODS`) over `split` (a split file path or a `Split`). `positives_table`:
    annotated cells / tiles (rows with binary = 1, same backbone) for a method that scores against them and for
    positive-bag augmentation. `stream`: see `load_bags` (None: hold the bags in memory when they fit).
    `row_labels`: the stored or the reviewed labels of the rows (`queries.labels`; `labels` is the slide labels
    file): which of `positives_table`'s rows are positive. `where`: a SQL filter on `tiles`' rows (e.g.
    "focus > 0.2"); only the rows it matches join the bags (checked by the store: a bad one is a `CytoError`)."""
    from cytoretrieve.queries.mil.bags import load_bags, load_positives
    from cytoretrieve.sources.cohort.split import load_split
    from cytoretrieve.store.tables import Store

    scoring = get_method(method)
    st = store if not isinstance(store, (str, Path)) else Store(store)
    if isinstance(split, (str, Path)):
        split = load_split(split)
    table = st.open(tiles)
    augment = train_config is not None and train_config.augment_positives > 0
    if augment and not scoring.trains:
        raise CytoError(f"`augment_positives` trains a model; `method` {method} trains none (drop one of them)")
    if augment and not positives_table:
        raise CytoError("`augment_positives` needs `positives` TABLE (annotated positive cells or tiles)")
    if positives_table and not scoring.positives and not augment:
        users = ", ".join(m.name for m in METHODS.values() if m.positives)
        raise CytoError(f"`positives` is used by `method` {users} and by `augment_positives`")
    positives = None
    if positives_table:
        pt = st.open(positives_table)
        if pt.fingerprint != table.fingerprint:
            raise CytoError(f"tables '{tiles}' and '{positives_table}' hold vectors of different backbones "
                            f"({table.meta['backbone'].get('arch')} {table.fingerprint[:12]} vs "
                            f"{pt.meta['backbone'].get('arch')} {pt.fingerprint[:12]})")
        positives = load_positives(pt, row_labels)
    bags = load_bags(table, labels, group_column=group_column, stream=stream, where=where or None)
    result = cross_validate(bags, split, method, train_config=train_config, retrieval_config=retrieval_config,
                            positives=positives)
    result.notes = bags.notes + result.notes
    if positives_table:
        from cytoretrieve.queries.labels import check_labels, reviewed_count

        used = {"labels": check_labels(row_labels), "table": positives_table,
                "reviewed_rows": reviewed_count(st, positives_table), "positives": len(positives.vectors)}
        result.config["positives_labels"] = used
        result.notes.append(f"positives: {used['positives']} rows of {positives_table} by their {row_labels} labels "
                            f"({used['reviewed_rows']} row(s) carry a review)")
    if where:
        result.config["where"] = where
        result.notes.append(f"rows of {tiles} matching `where` {where!r}: {bags.instances} tile(s)")
    return Scored(result, bags, table)


def top_tiles(result: CVResult, bags: Bags, n: int = 10) -> dict[str, Any]:
    """Each slide's `n` highest-scoring tiles (out-of-fold): ids `search `id`` can open, with their scores."""
    out: dict[str, Any] = {}
    pos = {name: i for i, name in enumerate(bags.names)}
    for slide, y, s, f in zip(result.slides, result.y, result.scores, result.fold_of):
        t = np.asarray(result.tile_scores.get(slide, []), dtype=np.float64)
        ids = bags.ids[pos[slide]] if bags.ids is not None else [str(i) for i in range(len(t))]
        order = np.argsort(-t, kind="stable")[:n]
        out[slide] = {"binary": y, "fold": f, "score": s, "tiles": len(t),
                      "top_tiles": [{"id": ids[i], "score": float(t[i])} for i in order]}
    return out


def tile_score_rows(result: CVResult, bags: Bags, table: VectorTable, *,
                    display: Callable[[str, Sequence[float]], np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One record per scored tile (the columns of `store.scores.TILE_COLUMNS`): slide (the row's `slide`, else its
    bag's name), tile id, level-0 x, y and
    side (from the tile id, else `tile_size`; null for rows without a place on a slide), the out-of-fold tile score
    (through `display`, e.g. `views.heatmap.display_scores`, so it is stored as the heat maps colour it), the slide
    score and fold. Rows are placed with one read of the table's located rows."""
    from cytoretrieve.ids import parse_tile_id
    from cytoretrieve.store.filters import HAS_LOCATION

    placed: dict[str, dict[str, Any]] = {}
    if {"x", "y", "slide", "tile_size"} <= set(table.columns):
        for r in table.read(["id", "slide", "x", "y", "tile_size"], HAS_LOCATION).to_pylist():
            parsed = parse_tile_id(r["id"])
            side = parsed[3] if parsed and parsed[1] == r["x"] and parsed[2] == r["y"] else r["tile_size"]
            placed[r["id"]] = {**r, "side": side}
    pos = {name: i for i, name in enumerate(bags.names)}
    out: list[dict[str, Any]] = []
    for slide, fold, slide_score in zip(result.slides, result.fold_of, result.scores):
        raw = result.tile_scores.get(slide, [])
        shown = display(result.method, raw) if display is not None else np.asarray(raw, dtype=np.float64)
        ids = bags.ids[pos[slide]] if bags.ids is not None and slide in pos else [str(i) for i in range(len(raw))]
        for tid, value in zip(ids, shown):
            spot = placed.get(tid, {})
            out.append({"slide": spot.get("slide") or slide, "tile_id": tid, "x": spot.get("x"), "y": spot.get("y"),
                        "side": spot.get("side"), "tile_size": spot.get("tile_size"), "score": float(value),
                        "slide_score": float(slide_score), "fold": int(fold)})
    return out
