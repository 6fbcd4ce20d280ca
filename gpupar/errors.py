"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input from the user: a flag, a file, a shape. The message names the bad value
    and what would be accepted."""


class TrainingError(Exception):
    """Training stopped for a reason the user must see (a non-finite loss, a failed rank)."""
