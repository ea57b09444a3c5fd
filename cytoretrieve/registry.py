"""One registry type for every kind of extension: index kinds, slide backends, detectors, MIL methods, votes,
slide signatures, map methods, stain normalisers.

Each is a name -> record mapping (a `dict`, so callers iterate, test membership and index it as before) that adds
the two things every registry had written for itself: `add` (with the rule for a name taken twice) and `lookup`,
whose error for an unknown name is the same one line everywhere, naming the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from cytoretrieve.errors import CytoError

T = TypeVar("T")


class Registry(dict[str, T]):
    """Records of one kind of extension by name. `what` names the kind in messages ("index kind"); `also` lists
    choices the caller handles itself before the lookup (e.g. `auto`), shown among the choices."""

    def __init__(self, what: str, *, also: Sequence[str] = ()) -> None:
        super().__init__()
        self.what = what
        self.also = tuple(also)

    def add(self, name: str, record: T, *, replace: bool = True) -> T:
        """Register `record` under `name` and return it; a taken name is replaced unless `replace` is False."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.what} needs a non-empty string name, not {name!r}")
        if name in self and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered (pass replace=True to replace it)")
        self[name] = record
        return record

    def copy(self) -> Registry[T]:
        """A registry of the same kind holding the same records (a test registers a toy one into a copy)."""
        out: Registry[T] = Registry(self.what, also=self.also)
        out.update(self)
        return out

    def choices(self) -> list[str]:
        """Every name a user may give: `also`, then the registered ones in registration order."""
        return [*self.also, *self]

    def lookup(self, name: str) -> T:
        """The record of `name`; a CytoError naming the choices when there is none."""
        if name not in self:
            raise CytoError(f"unknown {self.what} {name!r}: use one of {', '.join(self.choices())}")
        return self[name]

    def help(self, phrase: Callable[[T], str]) -> str:
        """"name: phrase; name: phrase ..." for a command's --help."""
        return "; ".join(f"{name}: {phrase(record)}" for name, record in self.items())
