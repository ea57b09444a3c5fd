"""The one exception type for mistakes a user can make (bad path, unknown model, wrong table...).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps its traceback.
Messages name the parameter at fault in backticks, as the Python API spells it (`tile_size`); the CLI shows the
flag instead (`--tile-size`), so the core never needs to know its command line.
"""


class CytoError(Exception):
    """A user-facing error with a one-line message."""
