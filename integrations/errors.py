"""The one exception type that reaches the user as a single line (run.py prints it and exits 2)."""


class UserError(Exception):
    """Bad input or environment: the message names the file or option and how to fix it."""
