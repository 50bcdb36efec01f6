"""The one exception type users see: a clear, single-line message about their input."""


class PixformerError(Exception):
    """Bad input or configuration. The CLI prints the message alone and exits non-zero."""
