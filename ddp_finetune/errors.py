"""The one exception type for bad input.

Anything the user can fix (a config value, a path, a file) raises `UserError` with a one-line
message that names the bad value and says how to fix it. The CLI prints it and exits 2.
"""


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2, no traceback."""


EXIT_USER_ERROR = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), to quote inside a UserError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
