"""The models: the ViT trunk at any patch size (PiT at patch 1) and ConvMixer, by name from the registry.
Position encodings and the attention function live here too: they are what the models compute with."""
from torch import nn

from .attention import AttnSpec, attention, record_attention, set_attention_backend
from .convmixer import ConvMixer, ConvMixerConfig, MixerBlock
from ..layout import patchify, unpatchify
from .vit import Block, VisionTransformer, ViTConfig

# What the speed switches, the planner and the analyses treat as "a block", found by type anywhere in
# a model (an encoder, a decoder, a wrapped model), never through a `model.blocks` attribute.
BLOCK_TYPES = (Block, MixerBlock)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks of `model` in forward order (module registration order), at any depth of nesting."""
    return [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]


__all__ = ["ViTConfig", "VisionTransformer", "Block", "ConvMixerConfig", "ConvMixer", "MixerBlock", "AttnSpec",
           "attention", "record_attention", "set_attention_backend", "patchify", "unpatchify", "blocks_of",
           "BLOCK_TYPES"]
