"""The next rows worth a review (`labels suggest`, the viewer's queue): every unreviewed row takes the vote of its
k nearest labelled rows (itself left out; the same vote as `classify`, `knn.VOTES`, on the reviewed labels of
`queries/labels.py`) and rows are ranked by that vote's margin (the winner's share minus the runner-up's): the
least sure first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.knn import vote_margin
from cytoretrieve.queries.labels import LabelsUsed, labelled_vectors
from cytoretrieve.store.labels import latest_events

if TYPE_CHECKING:
    from cytoretrieve.store.tables import VectorTable


@dataclass
class Suggestion:
    id: str
    margin: float  # 0 = the vote is a tie, 1 = unanimous
    predicted: str
    stored_label: str | None
    slide: str | None = None


@dataclass
class Suggestions:
    table: str
    vote: str
    k: int
    temperature: float
    labelled_rows: int
    candidates: int  # unreviewed rows within the class / slide asked for
    rows: list[Suggestion]
    used: LabelsUsed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def suggest(table: VectorTable, n: int = 50, *, klass: str | None = None, slide: str | None = None, k: int = 10,
            vote: str = "weighted", temperature: float = 0.07) -> Suggestions:
    """The `n` unreviewed rows whose k-NN vote on the reviewed labels is least sure (smallest margin), within the
    rows labelled or predicted `klass` and on `slide` when given (see the module docstring)."""
    from cytoretrieve.store.ann import exact_neighbours, l2_normalise

    if n < 1 or k < 1:
        raise CytoError(f"`n` and `k` must be >= 1 (got {n}, {k})")
    vectors, meta, used = labelled_vectors(table, ["id", "label", "slide"], "reviewed")
    ids = meta.column("id").to_pylist()
    labels = meta.column("label").to_pylist()
    slides = meta.column("slide").to_pylist()
    reviewed = {r for r, e in latest_events(table.store, table.name).items() if e.label is not None}
    known = np.array([lab is not None for lab in labels])
    classes = sorted({lab for lab in labels if lab is not None})
    if not classes:
        raise CytoError(f"table '{table.name}' has no labelled row: label a few first (`labels add`)")
    codes = np.array([classes.index(lab) if lab is not None else -1 for lab in labels])
    todo = np.array([r not in reviewed and (slide is None or s == slide) for r, s in zip(ids, slides)])
    x = l2_normalise(vectors)
    refs = np.flatnonzero(known)
    queries = np.flatnonzero(todo)
    if not len(queries):
        return Suggestions(table.name, vote, k, float(temperature), int(known.sum()), 0, [], used)
    kk = min(k + 1, len(refs))  # one more: a query with a stored label finds itself, and leaves itself out
    sims, idx = exact_neighbours(x[refs], x[queries], kk)
    own = refs[idx] == queries[:, None]
    width = max(1, min(k, kk - int(known[queries].any())))
    keep = np.argsort(own, axis=1, kind="stable")[:, :width]  # the row itself sorted last, then cut off
    sims, idx = np.take_along_axis(sims, keep, 1), np.take_along_axis(idx, keep, 1)
    winner, margin = vote_margin(codes[refs][idx], sims, len(classes), vote, temperature)
    if klass is not None:
        own_class = np.array([labels[q] if labels[q] is not None else classes[w] for q, w in zip(queries, winner)])
        inside = own_class == klass
        queries, winner, margin, sims, idx = (a[inside] for a in (queries, winner, margin, sims, idx))
    order = np.argsort(margin, kind="stable")[:n]
    rows = [Suggestion(ids[queries[i]], round(float(margin[i]), 4), classes[winner[i]], labels[queries[i]],
                       slides[queries[i]]) for i in order]
    return Suggestions(table.name, vote, int(idx.shape[1]) if idx.size else k, float(temperature), int(known.sum()),
                       len(queries), rows, used)
