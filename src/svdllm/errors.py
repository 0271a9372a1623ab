"""User-facing errors: each names the problem and the fix, so the CLI can print it without a traceback."""


class SvdllmError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""
