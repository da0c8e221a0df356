"""Errors for bad input (configs, files, data rows, model outputs, servers).

Raise `UserError` (or a subclass) with a message that names the field, value, file or server; the
`masa` command prints it as one line and exits with code 2 instead of a traceback.
"""


class UserError(ValueError):
    """Bad input the user can fix; the message names what is wrong and where."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); the last complete
    checkpoint is intact. The `masa` command prints it as one line and exits with code 1."""
