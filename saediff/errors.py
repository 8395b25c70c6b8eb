"""One exception type for bad input, so the CLI can print it as a single clear line."""


class SaediffError(ValueError):
    """Bad input or state that the user can fix (the message says what and where)."""
