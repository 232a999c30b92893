"""The one exception type that reaches the user as a single line (run.py prints it and exits 2)."""


class UserError(Exception):
    """Bad input or environment: the message names the file or option and how to fix it."""


def check_at_least(option: str, value, least) -> None:
    """A range check (the typed config has already checked that `value` is a number)."""
    if value < least:
        raise UserError(f'{option}={value}: must be >= {least}')
