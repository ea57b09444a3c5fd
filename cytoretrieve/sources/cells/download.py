"""Download, verify and unpack the public cell datasets, returning the folder `open_dataset` reads.

The registry holds the official addresses. No checksum is published for either dataset, so none is stored (never
guessed): an unpinned file is reported with the sha256 computed here (a warning), so the user can pin it with
`--sha256` next time. Downloads stream to `<file>.part`, resume over HTTP when the server allows, and are verified
before being unpacked. Addresses can be overridden (`url=`), including `file://` URLs and plain local paths.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cells.detect import DETECTORS, find_nested

Progress = Callable[[str, int, "int | None"], None]
"""Called as progress(file_name, bytes_done, bytes_total_or_None) while a file downloads."""

CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One archive to fetch. `sha256` is None when no checksum is published: the file is then only reported."""

    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    """A downloadable dataset: its archives, the layout they unpack to, and where the addresses come from."""

    name: str
    layout: str
    files: tuple[RemoteFile, ...]
    homepage: str
    cite: str


SIPAKMED_CLASSES = ("Superficial-Intermediate", "Parabasal", "Koilocytotic", "Dyskeratotic", "Metaplastic")

SOURCES: dict[str, Source] = {
    # smear2005.zip ("Part II: New Pap-smear Database (images)", 85.17 MB) is linked from the homepage; this direct
    # address is the one used by public loaders. No checksum is published.
    "herlev": Source(
        name="herlev",
        layout="herlev",
        files=(RemoteFile("http://mde-lab.aegean.gr/images/stories/docs/smear2005.zip"),),
        homepage="https://mde-lab.aegean.gr/index.php/downloads",
        cite="Jantzen et al., Pap-smear benchmark data for pattern classification, NiSIS 2005",
    ),
    # One 7-Zip archive per class (about 5.2 GB in all), linked from the homepage. No checksum is published.
    "sipakmed": Source(
        name="sipakmed",
        layout="sipakmed",
        files=tuple(RemoteFile(f"https://www.cs.uoi.gr/~marina/SIPAKMED/im_{c}.7z") for c in SIPAKMED_CLASSES),
        homepage="https://www.cs.uoi.gr/~marina/sipakmed.html",
        cite="Plissiti et al., SIPaKMeD: a new dataset for feature and image based classification of normal and "
        "pathological cervical cells in Pap smear images, ICIP 2018",
    ),
}


def download_dataset(
    name: str,
    to: Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch dataset `name` into folder `to`, verify, unpack, and return the dataset root inside `to`.

    `url` replaces the registry's archives with one archive (an http(s)/file URL or a local path); `sha256` pins the
    checksum (for a multi-archive source, one hex per archive, comma-separated, in registry order). When `to` already
    holds the unpacked dataset, nothing is downloaded.
    """
    source = SOURCES.get(name.lower())
    if source is None:
        raise CytoError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    to = Path(to).expanduser().resolve()
    if to.exists() and not to.is_dir():
        raise CytoError(f"{to} is a file; `to` must be a folder")
    files = _plan(source, url, sha256)
    if to.is_dir() and (root := _find_root(to, source.layout)) is not None:
        return root

    created = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    try:
        archives = [_fetch(f, to, progress) for f in files]
    except BaseException:
        if created and not any(to.iterdir()):
            to.rmdir()
        raise
    for archive in archives:
        _extract(archive, to)
    root = _find_root(to, source.layout)
    if root is None:
        raise CytoError(
            f"unpacked {', '.join(a.name for a in archives)} into {to} but found no {source.layout} layout there; "
            f"check the archive, or run `cytoretrieve datasets info` on the folder you expected"
        )
    for archive in archives:
        archive.unlink()
    return root


def _plan(source: Source, url: str | None, sha256: str | None) -> list[RemoteFile]:
    """The archives to fetch, with the user's address and checksums applied."""
    pins = [_check_hex(h) for h in sha256.split(",")] if sha256 else []
    if url is not None:
        if len(pins) > 1:
            raise CytoError("`url` names one archive, so give one `sha256`")
        return [RemoteFile(_as_url(url), pins[0] if pins else None)]
    if pins and len(pins) != len(source.files):
        raise CytoError(
            f"{source.name} has {len(source.files)} archives; give {len(source.files)} comma-separated `sha256` values "
            f"in this order: {', '.join(_file_name(f.url) for f in source.files)}"
        )
    return [RemoteFile(f.url, pin) for f, pin in zip(source.files, pins)] if pins else list(source.files)


def _check_hex(text: str) -> str:
    hexdigest = text.strip().lower()
    if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise CytoError(f"`sha256` must be 64 hex digits, got {text.strip()!r}")
    return hexdigest


def _as_url(url: str) -> str:
    """Accept a plain local path as well as a URL."""
    if urllib.parse.urlparse(url).scheme in ("http", "https", "ftp", "file"):
        return url
    path = Path(url).expanduser()
    if path.is_file():
        return path.resolve().as_uri()
    raise CytoError(f"`url` {url!r} is neither an http(s)/ftp/file URL nor an existing file")


def _file_name(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name or "download"


def _find_root(folder: Path, layout: str) -> Path | None:
    """`folder` itself or the shallowest folder below it (4 levels) that has the expected layout."""
    if DETECTORS[layout](folder):
        return folder
    found = find_nested(folder, (layout,), depth=4)
    return found[0] if found else None


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fetch(remote: RemoteFile, to: Path, progress: Progress | None) -> Path:
    """Download one archive into `to` (via `.part`), verify it, and return its final path."""
    name = _file_name(remote.url)
    dest = to / name
    if dest.is_file():  # kept from an earlier run whose unpacking failed
        if remote.sha256 is None or _sha256(dest) == remote.sha256:
            return dest
        dest.unlink()
    part = to / f"{name}.part"
    _stream(remote.url, part, name, progress)
    digest = _sha256(part)
    if remote.sha256 is not None and digest != remote.sha256:
        part.unlink()
        raise CytoError(
            f"checksum mismatch for {name}: expected sha256 {remote.sha256}, got {digest}; "
            "the download was deleted; check `url`/`sha256` or try again"
        )
    if remote.sha256 is None:
        warnings.warn(
            f"{name}: no published checksum, so it was not verified; its sha256 is {digest} "
            f"(pass `sha256` {digest} to pin it)",
            stacklevel=3,
        )
    part.replace(dest)
    return dest


def _stream(url: str, part: Path, name: str, progress: Progress | None) -> None:
    """Stream `url` into `part`, continuing an existing `.part` when the HTTP server honours a Range request."""
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cytoretrieve"})
    resumable = start > 0 and urllib.parse.urlparse(url).scheme in ("http", "https")
    if resumable:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and resumable:  # the .part is already complete
            return
        raise CytoError(
            f"cannot download {url}: HTTP {exc.code} {exc.reason}; check the address or pass `url`"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CytoError(
            f"cannot download {url}: {reason}; check the address or your connection, or pass `url`"
        ) from None
    with response:
        resumed = resumable and getattr(response, "status", None) == 206
        done = start if resumed else 0
        length = response.headers.get("Content-Length", "")
        total = done + int(length) if length.isdigit() else None
        try:
            with part.open("ab" if resumed else "wb") as fh:
                if progress:
                    progress(name, done, total)
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(name, done, total)
        except (OSError, http.client.HTTPException) as exc:
            raise CytoError(
                f"download of {name} stopped after {done} bytes ({exc}); run the same command again to resume"
            ) from None
    if total is not None and done < total:
        raise CytoError(
            f"download of {name} stopped after {done} of {total} bytes; run the same command again to resume"
        )


SEVEN_ZIP_MAGIC = b"7z\xbc\xaf\x27\x1c"
RAR_MAGIC = b"Rar!\x1a\x07"


def _extract(archive: Path, to: Path) -> None:
    """Unpack a zip or tar with the standard library, a 7z with py7zr or a 7-Zip program; refuse RAR clearly."""
    with archive.open("rb") as fh:
        head = fh.read(8)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:  # extractall drops absolute paths and ".." parts
                zf.extractall(to, members=[m for m in zf.namelist() if not m.startswith("__MACOSX/")])
        elif head.startswith(SEVEN_ZIP_MAGIC):
            _extract_7z(archive, to)
        elif head.startswith(RAR_MAGIC):
            raise CytoError(
                f"{archive} is a RAR archive, which cytoretrieve cannot unpack; extract it into {to} "
                f"with unrar or 7-Zip, then run `cytoretrieve datasets info` on the extracted folder"
            )
        elif tarfile.is_tarfile(archive):
            if not hasattr(tarfile, "data_filter"):
                raise CytoError(f"unpacking {archive.name} safely needs Python 3.11.4 or newer; extract it yourself")
            with tarfile.open(archive) as tf:
                tf.extractall(to, filter="data")  # refuses absolute paths, ".." and links leaving `to`
        else:
            raise CytoError(f"{archive} is not a zip, 7z or tar archive; check the `url`")
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise CytoError(f"cannot unpack {archive}: {exc}; delete it and download again") from None


def _extract_7z(archive: Path, to: Path) -> None:
    """SIPaKMeD ships 7-Zip archives: use py7zr when installed, else a 7z/7za/7zz program on PATH."""
    try:
        import py7zr  # optional; not a dependency
    except ImportError:
        py7zr = None
    if py7zr is not None:
        with py7zr.SevenZipFile(archive) as zf:
            zf.extractall(to)
        return
    exe = shutil.which("7z") or shutil.which("7za") or shutil.which("7zz")
    if exe is None:
        raise CytoError(
            f"{archive.name} is a 7-Zip archive and no 7-Zip extractor was found; install one (apt install p7zip-full, "
            f"or pip install py7zr) and run the same command again (downloaded archives are kept in {to})"
        )
    done = subprocess.run([exe, "x", "-y", f"-o{to}", str(archive)], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no message"]
        raise CytoError(f"7-Zip failed on {archive.name} (exit {done.returncode}): {last[0]}")
