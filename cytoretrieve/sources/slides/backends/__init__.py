"""Slide backends: one module per file format, chosen by a registry, so a new format is one file and one call.

    register_backend("toy", open_toy, extensions=(".toy",), probe=lambda path: path.read_bytes()[:1] == b"{")

`open_slide_file(path)` picks the backend: among those registered for the file's extension (every backend when
no backend claims it), the first, in registration order, whose probe accepts the file. The built-ins, in order:
`openslide` (the default: Aperio, Hamamatsu, MIRAX, tiled TIFF, ...), `tifffile` (TIFFs OpenSlide refuses:
untiled, OME-TIFF with focal planes) and `image` (a camera field: PNG, JPEG, BMP, TIFF, or a folder of one
field's planes). Their modules are imported on first use, so importing this package loads no slide library.

An opener is called as `opener(path, cache_bytes=...)` and returns a `SlideBackend`; it raises `CytoError` with
a one-line reason when the file is not what it reads. A probe takes the path and answers quickly (a header,
never the pixels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError
from cytoretrieve.registry import Registry
from cytoretrieve.sources.slides.backends.base import SlideBackend, SlideReadError

__all__ = ["BACKENDS", "Backend", "SlideBackend", "SlideReadError", "choose_backend", "open_slide_file",
           "register_backend"]

Opener = Callable[..., SlideBackend]
Probe = Callable[[Path], bool]


@dataclass(frozen=True)
class Backend:
    """A registered format: how to open it, the file extensions it claims (lower case) and its content check."""

    name: str
    opener: Opener
    extensions: tuple[str, ...]
    probe: Probe


BACKENDS: Registry[Backend] = Registry("slide backend", also=("auto",))


def register_backend(name: str, opener: Opener, *, extensions: tuple[str, ...] = (), probe: Probe | None = None) -> Backend:
    """Add (or replace) the backend `name`; `probe` defaults to accepting every file with one of `extensions`."""
    return BACKENDS.add(name, Backend(name, opener, tuple(e.lower() for e in extensions), probe or (lambda path: True)))


def choose_backend(path: str | Path) -> Backend | None:
    """The backend `open_slide_file` uses for `path` (see the module docstring), or None."""
    path = Path(path)
    suffix = path.suffix.lower()
    claimed = [b for b in BACKENDS.values() if suffix and suffix in b.extensions]
    for entry in claimed or list(BACKENDS.values()):
        try:
            if entry.probe(path):
                return entry
        except Exception:  # noqa: BLE001 - a probe that cannot tell says no (OpenSlideError, a PIL error, ...)
            continue
    return None


def open_slide_file(path: str | Path, backend: str = "auto", *, cache_bytes: int | None = None) -> SlideBackend:
    """Open `path` with `backend` ("auto": `choose_backend`); a `CytoError` with one line when nothing reads it.

    `cache_bytes` sizes the per-process cache of decoded tiles the backend shares between its open slides
    (None: the backend's default)."""
    path = Path(path)
    if backend == "auto":
        entry = choose_backend(path)
        if entry is None:
            raise CytoError(_diagnose(path))
    else:
        entry = BACKENDS.lookup(backend)
    return entry.opener(path, cache_bytes=cache_bytes)


def _diagnose(path: Path) -> str:
    if "openslide" in BACKENDS:
        return _module("openslide").diagnose(path)
    return "no such file" if not path.exists() else "not a format any slide backend reads"


def _module(name: str) -> Any:
    return import_module(f"{__name__}.{name}")


def _builtin(name: str, extensions: tuple[str, ...]) -> None:
    """Register a built-in backend whose module `<name>.py` is imported on first use (its `open_slide`, `probe`)."""
    register_backend(name, lambda path, **options: _module(name).open_slide(path, **options), extensions=extensions,
                     probe=lambda path: _module(name).probe(path))


_builtin("openslide", (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"))
_builtin("tifffile", (".tif", ".tiff", ".btf"))
_builtin("image", (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))
