"""The models: the ViT trunk at any patch size (PiT at patch 1), ConvMixer, DiT, MAE and the linear probe,
by name from the registry. Position encodings and the attention function live here too: they are what
the models compute with."""
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


def token_layout(model: nn.Module) -> tuple[int, bool]:
    """(patch side in pixels, whether a class token leads each image's tokens) of a model, or of the
    encoder it wraps (MAE, the probe): what a batcher of native-resolution images
    (`pixformer.data.native.batcher_for`) packs them for."""
    trunk = getattr(model, "encoder", model)
    return trunk.cfg.patch_size, getattr(trunk, "cls_token", None) is not None


__all__ = ["ViTConfig", "VisionTransformer", "Block", "ConvMixerConfig", "ConvMixer", "MixerBlock", "AttnSpec",
           "attention", "record_attention", "set_attention_backend", "patchify", "unpatchify", "blocks_of",
           "BLOCK_TYPES", "token_layout"]
