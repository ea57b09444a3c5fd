"""Core error messages in the CLI's words: a parameter named in backticks (`tile_size`) becomes its flag."""

from __future__ import annotations

import re

import typer

_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")


def _option_names() -> set[str]:
    """Every long option of every command, without its dashes (`tile-size`)."""
    import click

    from cytoretrieve import cli

    names: set[str] = set()
    todo: list[click.Command] = [typer.main.get_command(cli.app)]
    while todo:
        cmd = todo.pop()
        names.update(o[2:] for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("--"))
        todo.extend(getattr(cmd, "commands", {}).values())
    return names


def flag_message(message: str) -> str:
    """A core message with each backticked parameter that is a CLI option shown as that option (`--tile-size`)."""
    options = _option_names()

    def flag(m: re.Match[str]) -> str:
        name = m.group(1).replace("_", "-")
        return f"--{name}" if name in options else m.group(0)

    return _PARAM.sub(flag, message)
