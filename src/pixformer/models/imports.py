"""Moved to pixformer.engine.imports (weight conversion sits beside the checkpoint code that uses it).
This forwarding module keeps `engine/loop.py`'s old import working until it imports from the engine;
delete it then."""
from ..engine.imports import foreign_format, read_foreign  # noqa: F401
