"""Core error messages in the CLI's words: a parameter named in backticks (`tile_size`) becomes its flag."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import typer

from cytoretrieve.errors import CytoError

_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")
_LIBRARY = re.compile(r"Schema error|No field named|Valid fields are|Invalid input")


def _option_names() -> tuple[set[str], set[str]]:
    """Every long option of every command, without its dashes (`tile-size`), and every argument's name."""
    import click

    from cytoretrieve import cli

    names: set[str] = set()
    arguments: set[str] = set()
    todo: list[click.Command] = [typer.main.get_command(cli.app)]
    while todo:
        cmd = todo.pop()
        names.update(o[2:] for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("--"))
        arguments.update(p.name for p in cmd.params if getattr(p, "param_type_name", "") == "argument" and p.name)
        todo.extend(getattr(cmd, "commands", {}).values())
    return names, arguments


def flag_message(message: str) -> str:
    """A core message with each backticked parameter that is a CLI option shown as that option (`--tile-size`), and
    one that is a positional argument as its metavar (`source` -> SOURCE)."""
    options, arguments = _option_names()

    def flag(m: re.Match[str]) -> str:
        name = m.group(1).replace("_", "-")
        if name in options:
            return f"--{name}"
        return m.group(1).upper() if m.group(1) in arguments else m.group(0)

    # a library's own words quoted in a message (LanceDB's "No field named labl. Valid fields are `id`, ...")
    # name columns, not parameters: they are left as they are
    quoted = _LIBRARY.search(message)
    head, tail = (message[:quoted.start()], message[quoted.start():]) if quoted else (message, "")
    return _PARAM.sub(flag, head) + tail


@contextlib.contextmanager
def incomplete_tables(store: str, names: Iterable[str]) -> Iterator[None]:
    """Inside: a CytoError of a protocol says when one of its tables is incomplete (interrupted, or being written),
    since a table missing rows fails in puzzling ways ("needs at least 2 classes, found 1")."""
    try:
        yield
    except CytoError as e:
        from cytoretrieve.store.tables import Store

        st = Store(store)
        notes = [f"table '{n}' is {state}" for n in dict.fromkeys(names) if (state := st.write_state(n))]
        if not notes:
            raise
        raise CytoError(f"{e} ({'; '.join(notes)}: it misses the rows its job had not stored yet; rerun that job's "
                        "command to finish it)") from None
