"""Data: sources (sources; Hugging Face datasets on disk: hf), decoded once into a memory-mapped cache
(cache) and read as lazily indexed image sets (store), which images train / validate / test (splits),
images at their native resolution (native), batches made ahead on threads (loader), batch operations
(augment), and the locality ablations' pixel permutations (ablations). Nothing here knows a model."""
from .sources import NAMED_SOURCES, load_source
from .splits import Splits, channel_stats, holdout, resolve_splits
from .store import ImageSet, NativeSet

__all__ = ["ImageSet", "NativeSet", "load_source", "NAMED_SOURCES", "Splits", "resolve_splits", "holdout",
           "channel_stats"]
