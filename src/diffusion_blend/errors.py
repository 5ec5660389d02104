"""The exception types the CLI turns into one line on stderr: bad input exits 2, a run that
diverged exits 1."""


class UsageError(ValueError):
    """Input that is not allowed; the message names the value and what is allowed."""


class NonFiniteError(UsageError):
    """NaN or infinite numbers where finite ones are required (weights, outputs, JSON)."""


class DivergedError(RuntimeError):
    """A run whose loss or weights became non-finite; it stops instead of saving garbage."""
