"""The local web viewer (`cytoretrieve serve`): a FastAPI app over one store, its page shipped as static files.

The page (static/index.html + app.js + style.css, no build step) picks a table, queries by an uploaded or dropped
cell image or by clicking a stored cell or a hit, filters by label, binary class, dataset and slide, shows tile hits
on their slide's stored overview, and exports the hits as CSV or QuPath GeoJSON. Every query is also a JSON
endpoint, documented at /docs.

Errors: a bad request is one line of JSON `detail` (400; 404 for unknown tables, rows, slides; 413 for an upload
over the size limit; 401 without the token when one is required); an unexpected failure is a 500 with one line,
its traceback goes to the server log only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.search import MAX_PIXELS, SearchResult
from cytoretrieve.store.filters import Filters
from cytoretrieve.version import __version__
from cytoretrieve.views.web.errors import answer_errors, one_line
from cytoretrieve.views.web.labels_api import add_label_routes
from cytoretrieve.views.web.security import COOKIE, token_ok
from cytoretrieve.views.web.service import NotFound, RowReader, SearchRequest, Viewer
from cytoretrieve.views.web.slides import DEFAULT_QUALITY, SlideOpener, SlideTiles
from cytoretrieve.views.web.slides_api import add_slide_routes

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 2**20
FORM_SLACK = 64 * 1024  # multipart overhead and form fields allowed on top of the image
FORMATS = ("json", "csv", "geojson")
log = logging.getLogger("cytoretrieve.serve")

KParam = Annotated[int, Query(ge=1, le=200, description="Number of hits.")]
FormatParam = Annotated[str, Query(pattern="^(json|csv|geojson)$", description="json, csv or geojson (QuPath).")]


def _filters(label: str | None, binary: int | None, dataset: str | None, slide: str | None) -> Filters:
    return Filters(label=label or None, binary=binary, dataset=dataset or None, slide=slide or None)


def _respond(viewer: Viewer, result: SearchResult, fmt: str) -> Response:
    """The search as JSON, or as a CSV / QuPath GeoJSON download."""
    from cytoretrieve.views.geojson import geojson_text
    from cytoretrieve.views.hits import hit_squares, hits_csv

    if fmt == "csv":
        return Response(hits_csv(result), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{result.table}_hits.csv"'})
    if fmt == "geojson":
        return Response(geojson_text(hit_squares(result)), media_type="application/geo+json",
                        headers={"Content-Disposition": f'attachment; filename="{result.table}_hits.geojson"'})
    return JSONResponse(viewer.payload(result))


def _install_errors(app: FastAPI) -> None:
    answer_errors(app, {NotFound: 404, CytoError: 400})

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": one_line(f"`{where}`: {first.get('msg', 'invalid')}")}, status_code=422)


class Guard:
    """Token check, early 413 on a declared body over the limit, and no traceback ever in a response.

    A plain ASGI middleware (not `@app.middleware("http")`, whose request/response streaming cost about a
    millisecond per request): it sits inside Starlette's error middleware, so an unexpected exception of an
    endpoint reaches it first and becomes a one-line 500.
    """

    def __init__(self, app: Any, token: str | None, max_upload_bytes: int) -> None:
        self.app, self.token, self.max_upload_bytes = app, token, max_upload_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        h = request.headers
        if not token_ok(self.token, h.get("authorization"), h.get("x-token"), request.cookies.get(COOKIE),
                        request.query_params.get("token")):
            detail, status = "a valid token is required (Authorization: Bearer TOKEN)", 401
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        length = h.get("content-length", "")
        if length.isdigit() and int(length) > self.max_upload_bytes + FORM_SLACK:
            detail, status = f"upload over the limit of {self.max_upload_bytes:,} bytes", 413
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        cookie = self.token is not None and bool(request.query_params.get("token")) and scope["path"] == "/"
        started = False

        async def send_on(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cookie:
                    value = f"{COOKIE}={self.token}; HttpOnly; Path=/; SameSite=strict"
                    message["headers"] = [*message.get("headers", []), (b"set-cookie", value.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_on)
        except Exception:  # noqa: BLE001 - the traceback goes to the log, one line to the client
            log.exception("request %s %s failed", scope.get("method"), scope["path"])
            if started:
                raise
            detail = "internal error (the server log has the details)"
            await JSONResponse({"detail": detail}, status_code=500)(scope, receive, send)


def create_app(store_uri: str, *, token: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = MAX_PIXELS, device: str = "cpu", read_only: bool = False,
               reader: RowReader | None = None, slide_opener: SlideOpener | None = None,
               tile_quality: int = DEFAULT_QUALITY) -> FastAPI:
    """The viewer app over the store at `store_uri`; `token` (when set) is required on every request; `read_only`
    refuses label writes. `reader` reads a tile-table row at full resolution (`SlideReader().read_row`, passed in
    by `cli/serve.py`: views open no slide) for the large view; `slide_opener` opens a recorded slide path
    (`open_slide_file`, passed in likewise) for the Deep Zoom routes, whose JPEG tiles have `tile_quality`."""
    from cytoretrieve.store.tables import Store

    viewer = Viewer(Store(store_uri), max_pixels, device, reader)
    app = FastAPI(title="cytoretrieve viewer", version=__version__,
                  description="Similar-cell search over a cytoretrieve store: the page at / and its JSON endpoints.",
                  docs_url=None, redoc_url=None)  # /docs is served from the vendored Swagger UI (offline)
    _install_errors(app)
    app.add_middleware(Guard, token=token, max_upload_bytes=max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_routes(app, viewer, max_upload_bytes)
    add_label_routes(app, viewer.store, read_only=read_only)
    add_slide_routes(app, SlideTiles(viewer.store, slide_opener, quality=tile_quality))
    _add_docs(app)
    return app


def _add_docs(app: FastAPI) -> None:
    """The Swagger page from the vendored files (static/vendor/swagger-ui, see scripts/vendor_openseadragon.sh)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url="data:,", swagger_ui_parameters={"validatorUrl": None})


def _add_routes(app: FastAPI, viewer: Viewer, max_upload_bytes: int) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/tables", summary="The store's vector tables (name, rows, backbone, dimension)")
    def tables() -> list[dict[str, Any]]:
        return viewer.tables()

    @app.get("/api/tables/{name}/facets", summary="Filter choices: labels, binary classes, datasets, slides")
    def facets(name: str) -> dict[str, Any]:
        return viewer.facets(name)

    @app.get("/api/tables/{name}/rows", summary="A page of stored rows to browse (and click to search by id)")
    def rows(name: str, label: str | None = None, binary: int | None = None, dataset: str | None = None,
             slide: str | None = None, offset: Annotated[int, Query(ge=0)] = 0,
             limit: Annotated[int, Query(ge=1, le=500)] = 60) -> dict[str, Any]:
        return viewer.rows(name, _filters(label, binary, dataset, slide), offset, limit)

    @app.get("/api/tables/{name}/search", summary="Search by a stored row id")
    def search_by_id(name: str, id: Annotated[str, Query(description="A stored row id.")], k: KParam = 12,
                     label: str | None = None, binary: int | None = None, dataset: str | None = None,
                     slide: str | None = None, format: FormatParam = "json") -> Response:
        result = viewer.search(name, SearchRequest(k, row_id=id, filters=_filters(label, binary, dataset, slide)))
        return _respond(viewer, result, format)

    @app.post("/api/tables/{name}/search", summary="Search by an uploaded image (embedded with the table's backbone)")
    async def search_by_image(name: str, image: Annotated[UploadFile, File(description="A cell image.")],
                              k: Annotated[int, Form(ge=1, le=200)] = 12, label: Annotated[str | None, Form()] = None,
                              binary: Annotated[int | None, Form()] = None, dataset: Annotated[str | None, Form()] = None,
                              slide: Annotated[str | None, Form()] = None,
                              format: Annotated[str, Form(pattern="^(json|csv|geojson)$")] = "json") -> Response:
        data = await image.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return JSONResponse({"detail": f"upload over the limit of {max_upload_bytes:,} bytes"}, status_code=413)
        request = SearchRequest(k, image=data, filters=_filters(label, binary, dataset, slide), name=image.filename)
        result = await run_in_threadpool(viewer.search, name, request)
        return await run_in_threadpool(_respond, viewer, result, format)

    @app.get("/api/tables/{name}/thumbnail", summary="The stored thumbnail (JPEG) of a row")
    def thumbnail(name: str, id: str) -> Response:
        return Response(viewer.thumbnail(name, id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/tables/{name}/picture", summary="A row large (JPEG): a cell's source image, a tile read at full resolution")
    def picture(name: str, id: str) -> Response:
        return Response(viewer.picture(name, id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/overview", summary="A slide's stored overview picture (JPEG)")
    def overview(slide: str) -> Response:
        return Response(viewer.overview(slide), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
