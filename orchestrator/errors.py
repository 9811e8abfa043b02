"""Errors that end a command with exit status 2 and a one-line message."""


class UsageError(Exception):
    """Bad input or an environment that cannot run the command; nothing has been written."""
