"""pixformer: vision transformers at any token granularity, from 16x16 patches down to single pixels.

Layers, each importing only those below it:
    layout        token layout shared by data and models: patchify, grid coordinates, packed sequences
    models/       the ViT trunk (PiT at patch 1), ConvMixer, DiT, MAE, the linear probe, attention backends,
                  position encodings
    data/         sources, the mapped decode cache, train/val/test splits, batches, augmentation, ablations
    tasks/        what a run optimises and measures: classify, mae, probe, diffusion
    engine/       the training loop, runtime, checkpoints and run folders, speed switches, cost planner
    experiments/  demo, sweep, analyze, predict, export and the Hub, sampling, FID, resolution sweeps
    cli           the `pixformer` command

The names below are imported when first used, so `import pixformer.data` reads data without loading
the models, and `import pixformer` stays quick.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "Runtime": "engine", "Speed": "engine", "TrainConfig": "engine", "evaluate": "engine", "load_model": "engine",
    "train": "engine",
    "apply_activation_checkpointing": "engine.perf", "apply_compile": "engine.perf",
    "apply_onednn_linear": "engine.perf", "apply_lean_mlp": "engine.perf", "apply_lean_norms": "engine.perf", "apply_speed_settings": "engine.perf",
    "apply_depthwise_grad": "engine.perf", "autocast_dtype": "engine.perf",
    "set_allocator": "engine.perf", "plan": "engine.plan", "PixformerError": "errors",
    "AttnSpec": "models", "ViTConfig": "models", "VisionTransformer": "models", "attention": "models",
    "record_attention": "models", "set_attention_backend": "models",
    "create_model": "models.registry", "list_models": "models.registry",
    "predict": "experiments.predict", "Predictor": "experiments.predict", "export": "experiments.export",
    "export_onnx": "experiments.export", "HubModel": "experiments.hub", "load_hub": "experiments.hub",
}

__version__ = "0.2.0"
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pixformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
