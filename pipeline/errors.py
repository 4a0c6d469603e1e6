"""One exception type for every problem a user can fix: the CLI prints it as one line and exits 2."""


class ModrmError(Exception):
    """A user-facing error: bad input, mismatched cache or checkpoint, impossible settings."""
