"""Options shared by several commands, so each is spelled and documented once."""

from __future__ import annotations

from typing import Annotated

import typer

Store = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="CYTORETRIEVE_STORE",
        help="Store location: a folder (embedded LanceDB) or a LanceDB URI such as s3://bucket/path.",
        show_default=True,
    ),
]
Table = Annotated[str, typer.Option("--table", "-t", help="Table name in the store (see `cytoretrieve tables`).")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]
Labels = Annotated[str, typer.Option("--labels", help="stored: the labels rows were embedded with; reviewed: a row's latest expert review where it has one (`cytoretrieve labels`), else its stored label.")]
JsonOut = Annotated[str | None, typer.Option("--json", help="Also write the results as JSON to this file ('-' = stdout).")]

DEFAULT_STORE = "indexes"


def write_json(data: object, path: str) -> None:
    """Write `data` as indented JSON to `path`, or to stdout for '-'."""
    import json
    import sys
    from pathlib import Path

    text = json.dumps(data, indent=2, default=str)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
