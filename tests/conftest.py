import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Decoded-image caches and dataset downloads go to a temporary folder, never ~/.cache."""
    os.environ["PIXFORMER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["PIXFORMER_DATA"] = str(tmp_path_factory.mktemp("data"))
    torch.manual_seed(0)
    yield
