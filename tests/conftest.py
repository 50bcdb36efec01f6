import os
from pathlib import Path

import pytest
import torch

from pixformer.engine.loop import TIMING_KEYS


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Decoded-image caches and dataset downloads go to a temporary folder, never ~/.cache."""
    os.environ["PIXFORMER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["PIXFORMER_DATA"] = str(tmp_path_factory.mktemp("data"))
    torch.manual_seed(0)
    yield


@pytest.fixture
def resumes_exactly(tmp_path, monkeypatch):
    """check(run_kwargs, uninterrupted_result): the same run stopped by SIGTERM at step 5 and resumed
    ends with bit-identical weights (model and EMA) and the same metrics log as `uninterrupted_result`."""
    import json
    import signal

    import pixformer.engine.loop as loop
    from pixformer import PixformerError, TrainConfig, train

    def check(run: dict, full: dict) -> None:
        real = loop.lr_at
        monkeypatch.setattr(loop, "lr_at", lambda s, *a: (os.kill(os.getpid(), signal.SIGTERM) if s == 5 else None)
                            or real(s, *a))
        with pytest.raises(PixformerError, match="stopped"):
            train(TrainConfig(**run, out=str(tmp_path / "cut")))
        monkeypatch.undo()
        resumed = train(TrainConfig(**run, out=str(tmp_path / "cut"), resume=True))
        for part in ("model", "ema"):
            if full[part] is not None:
                for (name, a), (_, b) in zip(full[part].state_dict().items(), resumed[part].state_dict().items()):
                    assert torch.equal(a, b), f"{part}: {name}"
        rows = lambda d: [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS}  # noqa: E731
                          for l in (d / "metrics.jsonl").read_text().splitlines()]
        assert rows(tmp_path / "cut") == rows(Path(full["run_dir"]))
    return check
