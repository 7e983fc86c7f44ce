"""The one exception type for bad input.

Anything the user can fix (a config value, a path, a file) raises `UserError` with a one-line
message that names the bad value and says how to fix it. The CLI prints it and exits 2.
"""


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2, no traceback."""


EXIT_USER_ERROR = 2
