"""Helpers shared by the benchmark scripts: machine description, timing statistics and the optional JSON output.

Benchmarks on these shared 2-core machines are noisy, so every script measures the things it compares side by
side in one process and reports ratios; the helpers here only describe and summarise, they time nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERLEV = ROOT.parent / "shared" / "data" / "herlev_derived_jpg"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, CPU, Python and library versions, date (UTC)."""
    import numpy as np

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loadavg_start": loadavg(),
    }
    for name in ("torch", "timm", "faiss", "lancedb", "PIL"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            continue
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    return info


def loadavg() -> str:
    """/proc/loadavg's 1/5/15-minute load: above ~2 on 2 cores, other processes were competing for the CPU."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def print_machine(info: dict[str, Any]) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))


def print_load(when: str) -> str:
    """Print and return the load average (benchmarks print it at start and end: the figures' noise context)."""
    load = loadavg()
    print(f"load average {when}: {load}")
    return load


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation (numpy's default)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write the results as JSON to `path` (nothing when None)."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"results written to {path}")


def start_server(store_uri: str, port: int) -> subprocess.Popen:
    """`cytoretrieve serve --store STORE` on 127.0.0.1:`port` in its own process, waited for until it answers
    (two minutes at most; a server that exits or never answers is a RuntimeError with its output)."""
    import httpx

    cli = Path(sys.executable).with_name("cytoretrieve")
    proc = subprocess.Popen([str(cli), "serve", "--store", store_uri, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/tables", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not start: {proc.stdout.read() if proc.stdout else ''}")


def _files(folder: Path) -> list[Path]:
    return [f for f in Path(folder).rglob("*") if f.is_file() and f.stat().st_size]


def page_cached(folder: Path) -> tuple[int, int]:
    """(bytes of the files under `folder` now in the page cache, their total bytes), by `mincore` on a private
    mapping of each file: the evidence that a "cold page cache" figure was taken with the files out of memory."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    cached = total = 0
    for f in _files(folder):
        size = f.stat().st_size
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            pages = (size + page - 1) // page
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(ctypes.c_void_p(addr), size, vec) == 0:
                cached += sum(b & 1 for b in vec.raw) * page
            libc.munmap(ctypes.c_void_p(addr), size)
            total += size
        finally:
            os.close(fd)
    return min(cached, total), total


def evict(folder: Path) -> tuple[int, int]:
    """Drop the files under `folder` from the page cache (`posix_fadvise(DONTNEED)` after `fdatasync`, no root
    needed), so that the next process reads them from disk; returns `page_cached` afterwards."""
    for f in _files(folder):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return page_cached(folder)
