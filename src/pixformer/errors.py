"""The one exception type users see: a clear, single-line message about their input."""


class PixformerError(Exception):
    """Bad input or configuration. The CLI prints the message alone and exits non-zero.

    Under torchrun every rank meets the same bad input and rank 0 alone speaks; an error that one rank
    met alone (`rank` set) is printed by that rank, named."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def install_hint(extra: str) -> str:
    """How to install an optional part (an extra of pyproject.toml), as the docs say it."""
    return f"pip install -e '.[{extra}]' in the pixformer checkout"
