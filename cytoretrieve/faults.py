"""Failpoints for the fault tests: `CYTORETRIEVE_FAILPOINT=name` kills this process (SIGKILL, as `kill -9` would)
when it reaches `failpoint(name)`; `name:N` at its N-th arrival. Unset (always, outside the tests), a failpoint is a
dictionary lookup."""

from __future__ import annotations

import os
import signal

_arrivals: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Die here if the fault tests asked for it."""
    spec = os.environ.get("CYTORETRIEVE_FAILPOINT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
