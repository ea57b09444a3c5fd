"""What `cytoretrieve tables` shows of a local store, read without importing LanceDB (most of the command's time).

Each table's line (rows, size, backbone, weights, ...: everything but its write state, which is always read live
from the lease folder) is kept in `<store>/.summaries/<table>.json` with the table version it describes: the name,
size, modification time and inode of the newest manifest in `<table>.lance/_versions/`. Every LanceDB commit writes
a new manifest, so a summary whose key is not the newest manifest's is stale and is not used: that table's line is
read through LanceDB instead (`Store.describe_table`, which rewrites the summary; a job's `Table.finish` does too).
A missing, unreadable, foreign or stale summary costs time, never a wrong line. Remote stores (s3://, ...) always
go through LanceDB.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cytoretrieve.store.lease import state

FORMAT = 2  # bumped whenever TableInfo's fields change: older summaries are then stale
FOLDER = ".summaries"
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class TableInfo:
    """One line of `cytoretrieve tables`."""

    name: str
    rows: int
    dim: int
    arch: str
    fingerprint: str
    dataset: str
    bytes: int
    duplicates: int = 0  # rows beyond the first of each id
    state: str = ""  # '', 'writing (...)' or 'interrupted' (see `write_state`)
    weights: str = ""  # where the backbone's weights came from: random, timm, or the weights file's name
    detector: str = ""  # cell tables (and their vector tables): the nucleus detector that found the cells
    kind: str = ""  # what the rows are: cells (a cell dataset), tiles, cells on slides / fields (`cells`), overviews
    internal: bool = False  # a table the store keeps for itself (slide overviews): listed only on request
    normaliser: str = ""  # the stain normaliser the images went through before the model ('' for none)


def write_state(lease_folder: Path, name: str) -> str:
    """'' when no job writes table `name`; 'writing (pid P on H)' while one does; 'interrupted' when its writer was
    killed on this machine, or stopped with Ctrl-C, before finishing (rerun its command to add the rest)."""
    found = state(lease_folder, name)
    if found is None:
        return "interrupted" if (lease_folder / f"{name}.interrupted").exists() else ""
    what, holder = found
    return "interrupted" if what == "interrupted" else f"writing (pid {holder.get('pid')} on {holder.get('host')})"


def local_table_names(folder: Path) -> list[str]:
    """The tables of a local store folder: its `<name>.lance` folders, as LanceDB lists them."""
    try:
        return sorted(e.name[: -len(".lance")] for e in os.scandir(folder) if e.name.endswith(".lance") and e.is_dir())
    except OSError:
        return []


def version_key(folder: Path, name: str) -> dict[str, Any] | None:
    """The newest manifest of table `name`: {version, manifest, size, mtime_ns, inode}, or None when none can be read.

    Manifest names are the version (`3.manifest`) or, in Lance's newer naming, u64::MAX minus the version, so that
    they sort newest first; both are read. Size, mtime and inode tell a table dropped and recreated at the same
    version (and a copied store, whose summaries are then rewritten once)."""
    versions = folder / f"{name}.lance" / "_versions"
    best: tuple[int, str] | None = None
    try:
        entries = list(os.scandir(versions))
    except OSError:
        return None
    for entry in entries:
        stem, _, ext = entry.name.partition(".")
        if ext != "manifest" or not stem.isdigit():
            continue
        number = int(stem)
        version = _U64_MAX - number if number > 2**63 else number
        if best is None or version > best[0]:
            best = (version, entry.name)
    if best is None:
        return None
    try:
        st = (versions / best[1]).stat()
    except OSError:
        return None
    return {"version": best[0], "manifest": best[1], "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def read_summary(folder: Path, name: str) -> TableInfo | None:
    """Table `name`'s line from its summary if that describes the table's newest version, else None."""
    key = version_key(folder, name)
    if key is None:
        return None
    try:
        saved = json.loads((folder / FOLDER / f"{name}.json").read_text())
        if saved.get("format") != FORMAT or saved.get("key") != key:
            return None
        info = TableInfo(**saved["info"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return info if info.name == name else None


def write_summary(folder: Path, info: TableInfo, key: dict[str, Any]) -> None:
    """Keep `info` (read at the version `key` names) for the next `tables`; best effort: a read-only store folder,
    a full disk or a concurrent writer of the same summary only means the next `tables` reads LanceDB again."""
    target = folder / FOLDER / f"{info.name}.json"
    tmp = target.with_name(f".{info.name}.{os.getpid()}.tmp")
    payload = {"format": FORMAT, "key": key, "info": {**asdict(info), "state": ""}}
    try:
        target.parent.mkdir(exist_ok=True)
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def describe_local(uri: str) -> tuple[list[TableInfo], list[str]] | None:
    """(the lines the summaries answer, with their live write state; the names of the tables they do not) for a
    local store folder, or None for a URI or a path that is not a folder (LanceDB's `Store` says what it is)."""
    folder = Path(uri)
    if "://" in uri or (folder.exists() and not folder.is_dir()):
        return None
    infos, stale = [], []
    for name in local_table_names(folder):
        info = read_summary(folder, name)
        if info is None:
            stale.append(name)
        else:
            infos.append(TableInfo(**{**asdict(info), "state": write_state(folder / ".leases", name)}))
    return infos, stale

