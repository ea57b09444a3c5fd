"""`cytoretrieve serve`: the local web viewer over a store (FastAPI, served by uvicorn)."""

from __future__ import annotations

from typing import Annotated

import typer

from cytoretrieve.cli import options


def serve(
    store: options.Store = options.DEFAULT_STORE,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs --token (or --no-auth).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    token: Annotated[str | None, typer.Option("--token", envvar="CYTORETRIEVE_TOKEN", help="Require this token on every request (Authorization: Bearer, or open /?token=...).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve a non-loopback address without a token (anyone who can reach it can search).")] = False,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.01, help="Largest accepted upload.")] = 20.0,
    device: options.Device = "cpu",
    read_only: Annotated[bool, typer.Option("--read-only", help="Refuse every write (labels cannot be recorded).")] = False,
    tile_quality: Annotated[int, typer.Option("--tile-quality", min=1, max=95, help="JPEG quality of the slide viewer's tiles.")] = 80,
) -> None:
    """Open the similar-cell viewer in a browser: pick a table, drop a cell image or click a stored cell, see its
    nearest labelled cells with their pictures, filter them, see tile hits on their slide, export CSV / GeoJSON.

    Example: cytoretrieve serve --store indexes   (then open http://127.0.0.1:8000; the JSON API is at /docs)
    """
    import uvicorn

    from cytoretrieve.sources.slides.backends import open_slide_file
    from cytoretrieve.sources.slides.reader import SlideReader
    from cytoretrieve.views.web.app import create_app
    from cytoretrieve.views.web.security import resolve_token

    required = resolve_token(host, token, no_auth)
    app = create_app(store, token=required, max_upload_bytes=int(max_upload_mb * 2**20), device=device,
                     read_only=read_only, reader=SlideReader().read_row,  # tiles open large from their slide
                     slide_opener=open_slide_file, tile_quality=tile_quality)  # the slide viewer's Deep Zoom tiles
    shown = f"[{host}]" if ":" in host else host
    suffix = f"/?token={required}" if required else "/"
    typer.echo(f"cytoretrieve viewer on http://{shown}:{port}{suffix}  (API: /docs; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
