"""Errors that carry their exit code, so every front end maps them the same way."""


class SdstreamError(Exception):
    """A failure with a one-line message for the user. Exit code 1 (runtime failure)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class BadInput(SdstreamError):
    """The user asked for something invalid: exit code 2, no traceback."""

    exit_code = 2
