"""The viewer's label endpoints: record reviews (one or many rows in one action), list them, a row's history, undo
(one row, or every row of a bulk action in one commit), the next rows worth a review, and the table's 2-D map
(PCA or t-SNE, cached per table version in `store.maps`) the page lassoes rows on. They write only the store's
label log (`store.labels`), never a stored label.

Same rules as every other route (the app's `Guard`): the token when the server requires one (any non-loopback
bind). On top: a server started `read_only` refuses every write with 403, and writes take a JSON body only (a
cross-site HTML form cannot send one, so a page on another site cannot label through a loopback server).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cytoretrieve.store.tables import Store
from cytoretrieve.views.web.service import NotFound

MAX_EVENTS = 5000  # rows labelled in one request


class LabelItem(BaseModel):
    id: str = Field(min_length=1, description="The row id.")
    label: str = Field(min_length=1, description="A class of the table, or `unsure`.")
    note: str | None = None


class LabelRequest(BaseModel):
    reviewer: str = Field(min_length=1, max_length=200, description="Who labels (the page asks once).")
    labels: list[LabelItem] = Field(min_length=1, max_length=MAX_EVENTS)
    new_class: bool = Field(False, description="Accept labels that are not among the table's classes.")
    binary: int | None = Field(None, description="With new_class: the new classes' binary value (1, 0).")


class UndoRequest(BaseModel):
    id: str | None = Field(None, min_length=1, description="The row whose latest review is undone.")
    ids: list[str] | None = Field(None, min_length=1, max_length=MAX_EVENTS,
                                  description="Or many rows (a bulk action's), undone in one commit.")
    events: list[str] | None = Field(None, max_length=MAX_EVENTS,
                                     description="With `ids`: the action's event of each row; each row gets back "
                                                 "its review from before that event (a page's undo stack).")
    reviewer: str = Field(min_length=1, max_length=200)


def add_label_routes(app: FastAPI, store: Store, *, read_only: bool = False) -> None:
    """The label routes over `store`; `read_only` refuses every write (403)."""

    def table_name(name: str) -> str:
        if name not in store.table_names():
            raise NotFound(f"no table '{name}' in this store")
        return name

    def refused() -> JSONResponse:
        return JSONResponse({"detail": "this server is read-only: labels cannot be recorded"}, status_code=403)

    @app.get("/api/tables/{name}/labels", summary="The current reviews of a table (latest first) and their counts")
    def reviews(name: str, reviewer: str | None = None, disagree: bool = False) -> dict[str, Any]:
        from cytoretrieve.queries.labels import current_reviews, review_counts
        from cytoretrieve.store.labels import UNSURE, table_classes
        from cytoretrieve.store.tables import Table

        table = Table(store, store.open_raw(table_name(name)))
        rows = [r for r in current_reviews(table, reviewer) if r["disagrees"] or not disagree]
        classes, binary, _ = table_classes(store, name)
        return {"counts": review_counts(store, name), "reviews": rows, "read_only": read_only,
                "classes": classes, "binary": binary, "unsure": UNSURE}

    @app.post("/api/tables/{name}/labels", summary="Label rows (one event each, stored in one commit)")
    def record(name: str, request: LabelRequest) -> Any:  # noqa: ANN401 - the events, or the 403 response
        from cytoretrieve.store.labels import LabelInput, record_labels

        if read_only:
            return refused()
        items = [LabelInput(i.id, i.label, note=i.note) for i in request.labels]
        events = record_labels(store, table_name(name), items, reviewer=request.reviewer, source="expert",
                               new_class=request.new_class, binary=request.binary)
        return {"events": [e.to_dict() for e in events]}

    @app.get("/api/tables/{name}/labels/history", summary="Every label event of one row, oldest first")
    def history(name: str, id: Annotated[str, Query(description="A stored row id.")]) -> dict[str, Any]:
        from cytoretrieve.queries.labels import history as row_history

        return {"id": id, "events": row_history(store, table_name(name), id)}

    @app.post("/api/tables/{name}/labels/undo", summary="Undo a row's latest review, or many rows' (events too)")
    def undo(name: str, request: UndoRequest) -> Any:  # noqa: ANN401 - the events, or the 403 / 422 response
        from cytoretrieve.store.labels import undo_rows

        if read_only:
            return refused()
        if (request.id is None) == (request.ids is None):
            return JSONResponse({"detail": "`id` or `ids`: give one of them"}, status_code=422)
        if request.events is not None and request.ids is None:
            return JSONResponse({"detail": "`events` needs `ids`"}, status_code=422)
        events = undo_rows(store, table_name(name), request.ids or [request.id or ""], request.reviewer,
                           request.events)
        answer: dict[str, Any] = {"events": [e.to_dict() for e in events]}
        if request.id is not None:
            answer["event"] = answer["events"][0]
        return answer

    @app.get("/api/tables/{name}/labels/suggest", summary="The next rows worth a review: the least sure k-NN votes")
    def suggest(name: str, n: Annotated[int, Query(ge=1, le=500)] = 50, klass: Annotated[str | None, Query(alias="class")] = None,
                slide: str | None = None, k: Annotated[int, Query(ge=1, le=200)] = 10) -> dict[str, Any]:
        from cytoretrieve.errors import CytoError
        from cytoretrieve.queries.review_queue import suggest as run_suggest

        try:
            table = store.open(table_name(name))
        except CytoError as e:
            raise NotFound(str(e)) from e
        return run_suggest(table, n, klass=klass or None, slide=slide or None, k=k).to_dict()

    _add_map_route(app, store, table_name)


def _add_map_route(app: FastAPI, store: Store, table_name: Callable[[str], str]) -> None:
    """The table's 2-D map for the page's lasso, with each point's stored label and current review."""

    @app.get("/api/tables/{name}/map", summary="The table's 2-D map (ids, x, y in [0, 1], stored label, review)")
    def table_map(name: str, method: Annotated[str, Query(pattern="^[a-z0-9_]+$",
                                                          description="pca (default) or tsne")] = "pca") -> dict[str, Any]:
        from cytoretrieve.errors import CytoError
        from cytoretrieve.store.labels import latest_events
        from cytoretrieve.store.maps import map_info
        from cytoretrieve.store.maps import table_map as compute_map

        try:
            table = store.open(table_name(name))
        except CytoError as e:  # a table without vectors
            raise NotFound(str(e)) from e
        found = compute_map(table, method)
        reviews = {r: e.label for r, e in latest_events(store, name).items() if e.label is not None}
        return {**map_info(found), "ids": found.ids, "x": [round(float(v), 5) for v in found.x],
                "y": [round(float(v), 5) for v in found.y], "label": found.labels,
                "review": [reviews.get(i) for i in found.ids]}
