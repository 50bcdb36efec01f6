"""pixformer: vision transformers at any token granularity, from 16x16 patches down to single pixels."""
from .attention import attention, record_attention, set_attention_backend
from .errors import PixformerError
from .models import ViTConfig, VisionTransformer
from .perf import (apply_activation_checkpointing, apply_compile, apply_onednn_linear, apply_speed_settings,
                   autocast_dtype, set_allocator)
from .plan import plan
from .registry import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "ViTConfig", "VisionTransformer", "attention",
           "record_attention", "set_attention_backend", "PixformerError", "apply_activation_checkpointing",
           "apply_compile", "apply_onednn_linear", "apply_speed_settings", "autocast_dtype", "set_allocator", "plan"]
