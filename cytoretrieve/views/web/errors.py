"""The viewer's error answers: one line of JSON `detail` with the status an exception type maps to, never a
traceback. `app.py` maps the core's errors, `slides_api.py` the slide routes' own."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def one_line(message: str) -> str:
    """A message as one line of at most 500 characters."""
    return " ".join(str(message).split())[:500]


def answer_errors(app: FastAPI, statuses: dict[type[Exception], int]) -> None:
    """Answer each exception type with its status and its message as one line of `detail`."""
    for exc_type, status in statuses.items():
        async def answer(_: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"detail": one_line(str(exc))}, status_code=status)

        app.add_exception_handler(exc_type, answer)
