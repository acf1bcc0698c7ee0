"""Errors the CLI turns into one line on stderr and a non-zero exit."""

class HarnessError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
