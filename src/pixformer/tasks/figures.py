"""The figures the tasks and the commands write: labelled grids of images (matplotlib) and plain image
tiles with class names (PIL).

Each goes through `files.written(path)`, as every output does (text through `files.write_atomically`):
the new content goes to a temporary file beside it that replaces `path` only once whole, so a write
that fails (a full disk, a read-only folder, a name too long, a file where a folder should be) leaves
the old file as it was, no partial one, and is one line naming the path. A command checks its output
folder first (`files.output_folder`), before any work.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from ..files import written

MOST_COLUMNS = 16        # a grid has one column per class up to this many classes


# ---- writing ----------------------------------------------------------------------------------
def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure as a PNG, every label inside the canvas (the box drawn tight around them),
    then closed."""
    import matplotlib.pyplot as plt
    try:
        with written(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.08)
    finally:
        plt.close(fig)


# ---- grids ------------------------------------------------------------------------------------
def grid_columns(n: int, period: int, most: int = MOST_COLUMNS) -> int:
    """Columns of a grid of `n` images whose classes cycle through `period` classes (0: no classes):
    one column per class when there are at most `most`, else 8 (at most n either way)."""
    return max(1, min(n, period if 0 < period <= most else 8))


def grid_captions(names: list[str], ncol: int) -> list[list[str]]:
    """Per row, each image's caption (its class name, `names` in grid order): the first row only, when
    every row holds the same classes in the same columns (one column per class)."""
    rows = [names[i:i + ncol] for i in range(0, len(names), ncol)]
    same = all(row == rows[0][:len(row)] for row in rows)
    return [row if r == 0 or not same else [""] * len(row) for r, row in enumerate(rows)]


def image_grid(rows: list[Tensor], labels: list[str], path: Path, title: str,
               captions: list[list[str]] | None = None) -> None:
    """Rows of images (each (B, C, H, W) on 0..1; a shorter row leaves its last cells blank) as one PNG:
    a label before each row, `captions` (per row, one per image, "" for none) above the images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 0.4, 1.25 * len(rows) + 0.4), squeeze=False, dpi=110)
    for r, images in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= len(images):
                ax.axis("off")
                continue
            img = images[i].permute(1, 2, 0).float().numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img[..., :3], cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            if captions and captions[r][i]:
                ax.set_title(captions[r][i], fontsize=7)
        if labels[r]:
            axes[r][0].set_ylabel(labels[r], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


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


def labelled_tile(images: np.ndarray, ncol: int, names: list[str] | None = None, scale: int = 1, pad: int = 2):
    """(B, H, W, C) uint8 as one PIL image of `ncol` columns on white, each pixel drawn `scale` x `scale`;
    with `names` (one per image), each image's name written above it (grid_captions: above the first row
    only, when the grid has one column per class)."""
    from PIL import Image, ImageDraw, ImageFont
    big = images.repeat(scale, 1).repeat(scale, 2) if scale > 1 else images
    B, H, W, C = big.shape
    captions = grid_captions(names, ncol) if names else [[] for _ in range(0, B, ncol)]
    font = ImageFont.load_default(size=max(10, min(14, W // 6)))            # a bitmap font without FreeType
    strip = [getattr(font, "size", 11) + 4 if any(row) else 0 for row in captions]   # text above each row
    rows = len(captions)
    canvas = Image.new("RGB", (ncol * (W + pad) + pad, sum(strip) + rows * (H + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for r, row in enumerate(captions):
        for c, text in enumerate(row):
            x = pad + c * (W + pad)
            while text and draw.textlength(text, font=font) > W:        # cut to the cell's width
                text = text[:-1]
            draw.text((x + W / 2, y + strip[r] / 2), text, fill="black", font=font, anchor="mm")
        y += strip[r]
        for c in range(ncol):
            i = r * ncol + c
            if i < B:
                canvas.paste(Image.fromarray(big[i, ..., 0] if C == 1 else big[i]), (pad + c * (W + pad), y))
        y += H + pad
    return canvas


def save_png(image, path: Path, scale: int = 1) -> None:
    """An image ((H, W, C) uint8, or a PIL image) as a PNG, each pixel drawn `scale` x `scale`."""
    from PIL import Image
    img = image if isinstance(image, Image.Image) else Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with written(path) as tmp:
        img.save(tmp, format="PNG")
