"""`cytoretrieve score` as a function: a store table's bags cross-validated over a split file's folds.

`score_table` hands back the table and the bags it opened with the result, so that outputs (heat maps, GeoJSON,
top tiles) read them without opening the table again, and the split is checked once (by `cross_validate`).
"""

from __future__ import annotations

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
                stream: bool | None = None, row_labels: str = "stored") -> Scored:
    """Bags of table `tiles` (grouped by `group_column`, labelled by the labels CSV `labels`), cross-validated
    with `method` (a name of `methods.METHODS`) over `split` (a split file path or a `Split`). `positives_table`:
    annotated cells / tiles (rows with binary = 1, same backbone) for a method that scores against them and for
    positive-bag augmentation. `stream`: see `load_bags` (None: hold the bags in memory when they fit).
    `row_labels`: the stored or the reviewed labels of the rows (`queries.labels`; `labels` is the slide labels
    file): which of `positives_table`'s rows are positive."""
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
    bags = load_bags(table, labels, group_column=group_column, stream=stream)
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
