"""Writer leases: one job at a time writes a table, so that two runs of the same job cannot store a row twice.

LanceDB commits are atomic, but two processes appending the same rows both succeed (even `merge_insert` on `id`
does: each sees the other's rows only after committing), so a second `embed` of the same folder into the same
table would store every row again. A lease is a small file created exclusively (`O_EXCL`) beside the table (for
a remote store: in the local cache folder, so it guards one machine). The processes of one torchrun job share
their job's lease: they write disjoint rows and must keep writing in parallel. A lease whose holder died on this
host (kill -9, power loss) is stale and taken over; one held elsewhere is reported with its holder.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cytoretrieve.errors import CytoError

POLL_SECONDS = 1.0
SETTLE_SECONDS = 5.0  # an unreadable lease file older than this is treated as stale


def job_id() -> str:
    """Who is writing: the torchrun job (all its processes alike), else this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun:" + ":".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR",
                                                                       "MASTER_PORT"))
    return f"pid:{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    """A held lease; `owner` is True for the process that created the file (the one that removes it)."""

    path: Path
    job: str
    owner: bool

    def release(self) -> None:
        if not self.owner:
            return
        try:
            if json.loads(self.path.read_text()).get("job") == self.job:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.owner = False


def _dead(held: dict) -> bool:
    """The lease's holder ran on this host and is gone (a holder elsewhere cannot be checked: it counts as alive)."""
    return held.get("host") == socket.gethostname() and bool(held.get("pid")) and not _alive(int(held["pid"]))


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: treated as held until it is readable or stale


def state(folder: Path, table: str) -> tuple[str, dict] | None:
    """("writing", holder) while a job holds the table's lease, ("interrupted", holder) when its holder died on
    this host without finishing (kill -9, power loss: rerun its command to add the rest), else None."""
    held = _holder(folder / f"{table}.lease")
    if held is None:
        return None
    return ("interrupted" if _dead(held) else "writing"), held


def _create(path: Path, content: dict) -> bool:
    """Create the lease file with its content in one step (written aside, then hard-linked into place: the link
    fails if the file exists), so no other process ever reads it empty. True if we created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    tmp.write_text(json.dumps(content))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create, then write (a short empty window)
        try:
            with open(path, "x") as f:
                f.write(json.dumps(content))
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def acquire(folder: Path, table: str, wait: float = 0.0, poll: float = POLL_SECONDS) -> Lease:
    """The write lease of `table`, waiting up to `wait` seconds for another job's to be released (looking again
    every `poll` seconds: a job's lease is held for minutes, a label write's for milliseconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{table}.lease"
    me = job_id()
    deadline = time.monotonic() + max(wait, 0.0)
    damaged_since: float | None = None
    while True:
        mine = {"job": me, "host": socket.gethostname(), "pid": os.getpid(), "table": table,
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        if _create(path, mine):
            lease = Lease(path, me, owner=True)
            atexit.register(lease.release)
            return lease
        held = _holder(path)
        if held is None:
            continue  # released between our two calls
        if not held:  # unreadable: damaged (a full disk?); given a moment, then treated as stale
            damaged_since = damaged_since or time.monotonic()
            if time.monotonic() - damaged_since > SETTLE_SECONDS:
                path.unlink(missing_ok=True)
            time.sleep(0.05)
            continue
        if held.get("job") == me:
            return Lease(path, me, owner=False)
        if _dead(held):
            path.unlink(missing_ok=True)  # its holder died without releasing it
            continue
        if time.monotonic() >= deadline:
            who = f"pid {held.get('pid', '?')} on {held.get('host', '?')}, since {held.get('since', '?')}"
            raise CytoError(f"another job is writing table '{table}' ({who}): wait for it to finish, or pass "
                            f"`wait` SECONDS to wait for it")
        time.sleep(poll)
