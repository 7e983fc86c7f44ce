"""The one exception type for bad input.

Anything the user can fix (a config value, a path, a file) raises `UserError` with a one-line
message that names the bad value and says how to fix it. The CLI prints it and exits 2.
"""

_WORKER_PREFIX = (
    "Caught "  # torch's DataLoader: "Caught UserError in DataLoader worker process 0.\nOriginal Traceback ..."
)


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2, no traceback.

    Raised inside a DataLoader worker (an image that went bad during training, a label out of
    range), it reaches the main process re-created by torch as `UserError("Caught UserError in
    DataLoader worker process N.\\nOriginal Traceback ...")`: the constructor keeps only the
    original one-line message, the last line of that traceback.
    """

    def __init__(self, message: str = "", *args):
        if isinstance(message, str) and message.startswith(_WORKER_PREFIX) and "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]  # "ddp_finetune.errors.UserError: <message>"
            message = last.partition(": ")[2] or last
        super().__init__(message, *args)


EXIT_USER_ERROR = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), to quote inside a UserError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
