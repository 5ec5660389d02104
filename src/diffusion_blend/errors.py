"""The one exception type for bad input: the CLI turns it into a one-line error and exit code 2."""


class UsageError(ValueError):
    """Input that is not allowed; the message names the value and what is allowed."""
