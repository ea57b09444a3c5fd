"""Core error messages in the CLI's words: a parameter named in backticks (`tile_size`) becomes its flag."""

from __future__ import annotations

import re

import typer

_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")


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

    return _PARAM.sub(flag, message)
