"""The viewer's slide routes: a slide's description, its Deep Zoom (DZI) pyramid of JPEG tiles, and its overlays.

    GET /api/slides/{slide}                                   size, mpp, planes, Deep Zoom layout (JSON)
    GET /api/slides/{slide}/dzi                               the DZI description (XML) for OpenSeadragon
    GET /api/slides/{slide}/tiles/{level}/{col}_{row}.jpeg    one tile (`plane` query parameter for z-stacks)
    GET /api/slides/{slide}/overlays                          tiles kept and cells found on the slide (JSON)
    GET /api/slides/{slide}/scores                            saved score runs with tiles on the slide (JSON)
    GET /api/slides/{slide}/scores/{run}                      a run's tile scores on the slide, its colour scale
    GET /api/tables/{name}/slides/{slide}/similar             slides like this slide (signature, k)

Slides are named by id and looked up in the store (`slides.py`). An unknown slide, level, tile or plane is a 404,
a slide id that could be a path a 400, a slide whose file moved a 410 with one line the page shows. Tiles are
read in `SlideTiles.executor` (never on the event loop) and carry `Cache-Control` and an `ETag`.
"""

from __future__ import annotations

import asyncio
import re
from functools import partial
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from cytoretrieve.store.tables import Store
from cytoretrieve.views.web.errors import answer_errors
from cytoretrieve.views.web.slides import (
    TILE_CACHE_CONTROL,
    SlideTiles,
    SlideUnavailable,
    UnknownSlide,
    check_slide_id,
)

_INDEX = re.compile(r"^[0-9]{1,9}$")


def add_slide_routes(app: FastAPI, tiles: SlideTiles) -> None:
    """Mount the slide routes over `tiles` and their error answers."""

    answer_errors(app, {UnknownSlide: 404, SlideUnavailable: 410})

    @app.get("/api/slides/{slide}", summary="A slide's size, pixel size (mpp), focal planes and Deep Zoom layout")
    def slide_info(slide: str) -> dict[str, Any]:
        return tiles.info(slide)

    @app.get("/api/slides/{slide}/dzi", summary="A slide's Deep Zoom description (DZI XML, as OpenSlide's DeepZoomGenerator)")
    def slide_dzi(slide: str) -> Response:
        return Response(tiles.dzi(slide), media_type="application/xml", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/api/slides/{slide}/tiles/{level}/{col}_{row}.jpeg", summary="One Deep Zoom tile (JPEG)")
    async def slide_tile(request: Request, slide: str, level: str, col: str, row: str,
                         plane: Annotated[int, Query(ge=0, le=1000, description="Focal plane (z-stacks).")] = 0) -> Response:
        if not all(_INDEX.match(v) for v in (level, col, row)):  # a level or address that is no number: no such tile
            raise UnknownSlide(f"no tile {col[:20]}_{row[:20]} at level {level[:20]} of slide '{slide[:80]}'")
        loop = asyncio.get_running_loop()
        data, etag = await loop.run_in_executor(tiles.executor,
                                                partial(tiles.tile, slide, int(level), int(col), int(row), plane))
        headers = {"Cache-Control": TILE_CACHE_CONTROL, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/api/slides/{slide}/overlays", summary="What the page draws over a slide: tiles kept, cells found")
    def slide_overlays(slide: str) -> JSONResponse:
        return JSONResponse(tiles.overlays(slide), headers={"Cache-Control": "no-store"})

    @app.get("/api/slides/{slide}/scores", summary="Saved tile-score runs (`score --save-scores`) with tiles on a slide")
    def slide_scores(slide: str) -> JSONResponse:
        return JSONResponse(tiles.score_runs(slide), headers={"Cache-Control": "no-store"})

    @app.get("/api/slides/{slide}/scores/{run}", summary="A saved run's tile scores on a slide ([x, y, side, score], level-0 px) and its colour scale")
    def slide_score_layer(slide: str, run: str) -> JSONResponse:
        return JSONResponse(tiles.score_layer(slide, run), headers={"Cache-Control": "no-store"})

    @app.get("/api/tables/{name}/slides/{slide}/similar", summary="Slides like this slide: the nearest slides of a table by slide signature, with their labels")
    def similar(name: str, slide: str, signature: Annotated[str, Query(pattern="^[a-z_]{1,32}$", description="Slide signature: mean or mosaic.")] = "mosaic",
                k: Annotated[int, Query(ge=1, le=50, description="Number of slides.")] = 5) -> dict[str, Any]:
        return similar_slides(tiles.store, name, slide, signature, k)


def similar_slides(store: Store, table: str, slide: str, signature: str, k: int) -> dict[str, Any]:
    """`queries.slides.similar_slides` for the page; a slide the table does not hold is a 404."""
    from cytoretrieve.queries.slides import similar_slides as nearest
    from cytoretrieve.queries.slides import slide_signatures

    check_slide_id(slide)
    if table not in store.table_names():
        raise UnknownSlide(f"no table '{table}' in this store")
    vectors = store.open(table)
    if slide not in slide_signatures(vectors, signature).slides:
        raise UnknownSlide(f"no slide '{slide}' in table '{table}'")
    return nearest(vectors, slide, kind=signature, k=k).to_dict()
