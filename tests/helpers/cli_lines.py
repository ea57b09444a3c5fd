"""What every user error must look like from the command line: exit 2 and one line on stderr, no traceback."""

from __future__ import annotations

from cytoretrieve.cli import run


def one_line_exit_2(argv: list[str], capsys) -> str:  # noqa: ANN001 - pytest's capsys fixture
    """Run the CLI on `argv`, check exit 2 with a single stderr line, and return that line."""
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
