"""The `cytoretrieve` command line: a typer app, one module per command group, thin over the Python API.

Heavy libraries (torch, timm, lancedb, faiss, sklearn) are imported inside the commands, so `--help` is instant.
A `CytoError` (a user mistake) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from cytoretrieve.cli import (
    annotate,
    cells,
    classify,
    datasets,
    demo,
    embed,
    index,
    interop,
    labels,
    score,
    search,
    serve,
    split,
    tables,
    tile,
    train,
    transfer,
)
from cytoretrieve.cli.messages import flag_message
from cytoretrieve.errors import CytoError
from cytoretrieve.version import __version__

app = typer.Typer(
    name="cytoretrieve",
    help="Pap-smear cytology images to a searchable embedding store: embed once, then evaluate k-NN "
    "(classify), find similar cells (search), transfer and score slides from the stored vectors.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("embed")(embed.embed)
app.command("classify")(classify.classify)
app.command("search")(search.search)
app.command("serve")(serve.serve)
app.command("tables")(tables.tables)
app.command("dedupe")(index.dedupe)
app.command("demo")(demo.demo)
app.command("train")(train.train)
app.add_typer(interop.export_app, name="export")  # export weights CKPT (also: export CKPT) | export h5
app.add_typer(interop.import_app, name="import")
app.command("tile")(tile.tile)
app.add_typer(cells.app, name="cells")
app.command("split")(split.split)
app.command("transfer")(transfer.transfer)
app.command("score")(score.score)
app.add_typer(annotate.app, name="annotations")
app.add_typer(datasets.app, name="datasets")
app.add_typer(index.app, name="index")
app.add_typer(labels.app, name="labels")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cytoretrieve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Pap-smear cytology images to a searchable embedding store."""


class _Warnings(logging.Handler):
    """The core's warnings (`logging.getLogger("cytoretrieve")`), one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"cytoretrieve: warning: {flag_message(record.getMessage())}", file=sys.stderr)


def _log_warnings() -> None:
    log = logging.getLogger("cytoretrieve")
    if not any(isinstance(h, _Warnings) for h in log.handlers):
        log.addHandler(_Warnings(logging.WARNING))
        log.propagate = False


def _click_exceptions():  # noqa: ANN202 - the module
    """The exceptions of the click that typer runs on (recent typer vendors its own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` and return its exit code (what `main` exits with; handy in tests)."""
    click = _click_exceptions()
    _log_warnings()
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="cytoretrieve", standalone_mode=False)
    except click.NoArgsIsHelpError:  # a group called bare: typer has printed its help already
        return 0
    except click.UsageError as e:  # a bad option value, an unknown option, a missing argument: one line, not a box
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print(f"cytoretrieve: error: {e.format_message()}{hint}", file=sys.stderr)
        return 2
    except typer.Abort:  # Ctrl-C at a prompt
        print("cytoretrieve: aborted", file=sys.stderr)
        return 130
    except typer.Exit as e:
        return int(e.exit_code)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except CytoError as e:
        print(f"cytoretrieve: error: {flag_message(str(e))}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run())
