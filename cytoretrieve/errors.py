"""The one exception type for mistakes a user can make (bad path, unknown model, wrong table...).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class CytoError(Exception):
    """A user-facing error with a one-line message."""
