from .vit import ViTConfig, VisionTransformer

__all__ = ["ViTConfig", "VisionTransformer"]
