"""Data: sources read into uint8 tensors (sources), which images train / validate / test (splits),
batch operations (augment), and the locality ablations' pixel permutations (ablations)."""
from .sources import NAMED_SOURCES, ImageSet, load_source
from .splits import Splits, channel_stats, holdout, resolve_splits

__all__ = ["ImageSet", "load_source", "NAMED_SOURCES", "Splits", "resolve_splits", "holdout", "channel_stats"]
