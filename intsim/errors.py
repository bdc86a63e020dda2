"""User-facing errors: the command line prints the message and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (unknown model, unreadable file, bad option...). Exit code 2."""

    exit_code = 2
