from .convmixer import ConvMixer, ConvMixerConfig
from .vit import ViTConfig, VisionTransformer

__all__ = ["ViTConfig", "VisionTransformer", "ConvMixerConfig", "ConvMixer"]
