"""Exit statuses of `nptm`, and the error that ends a command with status 2."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input or an environment that cannot run the command; nothing has been written."""
