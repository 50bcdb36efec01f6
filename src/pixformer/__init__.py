"""pixformer: vision transformers at any token granularity, from 16x16 patches down to single pixels.

Layers, each importing only those below it:
    models/       the ViT trunk (PiT at patch 1), ConvMixer, attention backends, position encodings, registry
    data/         sources, train/val/test splits, batch augmentation, locality ablations
    tasks/        what a run optimises and measures: classify
    engine/       the training loop, runtime, checkpoints, speed switches, cost planner
    experiments/  demo, sweep, analyze
    cli           the `pixformer` command
"""
from .engine import Runtime, Speed, TrainConfig, evaluate, load_model, train
from .engine.perf import (apply_activation_checkpointing, apply_compile, apply_onednn_linear, apply_speed_settings,
                          autocast_dtype, set_allocator)
from .engine.plan import plan
from .errors import PixformerError
from .models import AttnSpec, ViTConfig, VisionTransformer, attention, record_attention, set_attention_backend
from .models.registry import create_model, list_models

__version__ = "0.2.0"
__all__ = ["create_model", "list_models", "ViTConfig", "VisionTransformer", "attention", "AttnSpec",
           "record_attention", "set_attention_backend", "PixformerError", "TrainConfig", "train", "evaluate",
           "load_model", "Speed", "Runtime", "apply_activation_checkpointing", "apply_compile", "apply_onednn_linear",
           "apply_speed_settings", "autocast_dtype", "set_allocator", "plan"]
