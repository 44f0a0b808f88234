"""The one exception type for mistakes a user can make (bad config, bad path, bad data).

The CLI turns a ``UserError`` into a single ``error: ...`` line and exit code 2. The message must
say what is wrong and where (file, row, key); library code raises it instead of printing.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line; never a traceback."""
