"""Figures the tasks write: labelled rows of images (matplotlib), and plain image tiles (PIL)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor


def image_grid(rows: list[Tensor], labels: list[str], path: Path, title: str) -> None:
    """Rows of images (each (B, C, H, W) on 0..1) as one PNG, a label at the start of each row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.2 * len(rows) + 0.4), squeeze=False, dpi=110)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for i in range(n):
            ax = axes[r][i]
            img = images[i].permute(1, 2, 0).float().numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img[..., :3], cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) on 0..1 -> (B, H, W, C) uint8 (one channel kept as (B, H, W, 1))."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def tile(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows * (H + pad) + pad, ...) uint8 image, `nrow` images per row, on white."""
    B, H, W, C = images.shape
    rows = -(-B // nrow)
    out = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        out[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return out


def save_png(image: np.ndarray, path: Path, scale: int = 1) -> None:
    """(H, W, C) uint8 as a PNG, each pixel drawn `scale` x `scale` (small images stay visible)."""
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
