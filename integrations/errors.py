"""The one exception type that reaches the user as a single line (run.py prints it and exits 2)."""


class UserError(Exception):
    """Bad input or environment: the message names the file or option and how to fix it."""


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole_number(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_whole_number(option: str, value, least: int) -> None:
    if not is_whole_number(value, least):
        raise UserError(f'{option}={value}: must be a whole number >= {least}')


def check_flag(option: str, value) -> None:
    """A yes/no option given as something else (`maybe`, 2) is a mistake, not a truthy value."""
    if not isinstance(value, bool):
        raise UserError(f'{option}={value}: use true or false')
