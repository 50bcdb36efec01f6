"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, arXiv 2201.09792): the patch stem of a
ViT followed by convolutions instead of attention, at a constant resolution throughout.

    patch_embed: Conv2d(C, D, p, stride=p) -> GELU -> BatchNorm       (B, D, H/p, W/p)
    depth x [ x + BN(GELU(depthwise k x k conv(x)))                   spatial mixing
              BN(GELU(pointwise 1x1 conv(x))) ]                        channel mixing
    global average pool -> linear head

Names: ConvMixer-D/d is width D and depth d; kernel size k and patch size p are settings
(pixformer's defaults, k=5 and p=2, are those of the authors' CIFAR-10 script, locuslab/convmixer-cifar10).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import PixformerError
from ..layout import check_grid, check_images
from ..settings import check_fields, require, square


@dataclass
class ConvMixerConfig:
    img_size: tuple[int, int] = (32, 32)  # size trained at (the model itself runs at any size)
    patch_size: int = 2                   # stem stride; 1 = a per-pixel linear stem, as PiT
    in_chans: int = 3                     # image channels (set by the data)
    num_classes: int = 10                 # 0 = no head
    dim: int = 256                        # width D: channels at every layer
    depth: int = 8                        # mixer blocks
    kernel_size: int = 5                  # of the depthwise (spatial mixing) convolution

    def __post_init__(self):
        self.img_size = square(self.img_size)
        check_fields(self)                                          # every field its type, in one line if not
        for name in ("patch_size", "dim"):
            require(name, getattr(self, name), getattr(self, name) >= 1, "at least 1")
        require("depth", self.depth, self.depth >= 0, "at least 0")
        require("in_chans", self.in_chans, self.in_chans >= 1, "at least 1")
        require("num_classes", self.num_classes, self.num_classes >= 0, "at least 0 (0: no head)")
        if self.kernel_size < 1:
            raise PixformerError(f"kernel size must be at least 1, got {self.kernel_size}")
        check_grid(self.img_size, self.patch_size)


def conv_act_norm(conv: nn.Conv2d) -> nn.Sequential:
    """conv -> GELU -> BatchNorm, the unit ConvMixer is built of (activation before the norm, as in the paper)."""
    return nn.Sequential(conv, nn.GELU(), nn.BatchNorm2d(conv.out_channels))


class MixerBlock(nn.Module):
    """Depthwise conv with a residual (mixes space), then a pointwise conv (mixes channels)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.spatial = conv_act_norm(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"))
        self.channel = conv_act_norm(nn.Conv2d(dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.spatial(x)                                           # (B, D, h, w)
        return self.channel(x)                                            # (B, D, h, w)


class ConvMixer(nn.Module):
    def __init__(self, cfg: ConvMixerConfig):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, p, stride=p)   # a ViT's patch embedding, as a conv
        self.embed_act = nn.GELU()
        self.embed_norm = nn.BatchNorm2d(D)
        self.blocks = nn.ModuleList(MixerBlock(D, cfg.kernel_size) for _ in range(cfg.depth))
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.init_weights()

    def init_weights(self):
        """All initialisation in one place: PyTorch's default (Kaiming-uniform) conv and linear init,
        as the authors' code uses; unit / zero BatchNorm affine and fresh running statistics."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                m.reset_parameters()

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed_norm(self.embed_act(self.patch_embed(check_images(images, self.cfg.in_chans))))  # (B, D, H/p, W/p)
        for block in self.blocks:
            x = block(x)                                                  # (B, D, H/p, W/p)
        pooled = x.mean(dim=(2, 3))                                       # (B, D) global average pool
        return self.head(pooled)                                          # (B, classes)

    # ---- cost ------------------------------------------------------------------------------
    def flops(self, img_size: tuple[int, int] | None = None) -> int:
        """Forward FLOPs for one image (a multiply-add counts as 2), convolutions and the head only."""
        c = self.cfg
        gh, gw = check_grid(img_size or c.img_size, c.patch_size)
        n = gh * gw                                                       # positions ("tokens")
        stem = 2 * n * c.in_chans * c.patch_size ** 2 * c.dim
        per_block = 2 * n * c.dim * c.kernel_size ** 2 + 2 * n * c.dim * c.dim  # depthwise + pointwise
        return stem + c.depth * per_block + 2 * c.dim * c.num_classes
