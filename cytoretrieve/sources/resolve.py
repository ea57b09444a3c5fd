"""What a data argument names (`embed SOURCE`, `train --data`, `train --paste-cells`): one set of rules, so every
command reads the same argument the same way.

- an existing folder -> "folder" (what is inside it is for the job to read: a cell dataset, images below it);
- an existing .csv file -> "manifest";
- an existing slide file (`ids.SLIDE_EXTENSIONS`: the slide backends' endings, camera images included) -> "slide";
- a name that is not a path (no separator, no file ending) -> "table", a table of the store: the caller opens
  it (sources never open the store) and reports a missing one with `not_a_table`;
- anything else (a missing path, another kind of file) is a CytoError naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cytoretrieve.errors import CytoError

KINDS = ("folder", "manifest", "slide", "table")


@dataclass(frozen=True)
class Source:
    """A resolved data argument: its kind and its value (an absolute path, or the table's name)."""

    kind: str
    value: str

    @property
    def path(self) -> Path:
        return Path(self.value)


def resolve_source(spec: str | Path, *, param: str = "source") -> Source:
    """The kind of `spec` by the rules above; `param` is the parameter's name for error messages."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return Source("folder", str(path.resolve()))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return Source("manifest", str(path.resolve()))
        from cytoretrieve.ids import SLIDE_EXTENSIONS

        if suffix in SLIDE_EXTENSIONS:
            return Source("slide", str(path.resolve()))
        raise CytoError(f"`{param}` {path} is a file but neither a CSV manifest nor a slide "
                        f"({', '.join(sorted(SLIDE_EXTENSIONS))}): pass a folder, a CSV manifest or a table name")
    if path.exists() or "/" in text or "\\" in text or path.suffix:
        raise CytoError(f"`{param}` not found: {path}")
    return Source("table", text)


def not_a_table(name: str, store_uri: str, tables: list[str], param: str = "source") -> CytoError:
    """The error for a name that is no table of the store (the message both embed and train give)."""
    shown = ", ".join(sorted(tables)[:8]) + (" ..." if len(tables) > 8 else "") if tables else "none"
    return CytoError(
        f"`{param}` {name!r} not found: it is neither a folder, a CSV manifest nor a tile table of store"
        f" {store_uri} (tables: {shown}; make one with `cytoretrieve tile`, or pass `store`)"
    )
