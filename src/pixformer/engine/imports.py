"""Pretrained ViT weights from the two formats users have, renamed onto pixformer's ViT:

    a Hugging Face transformers ViT folder   config.json ("model_type": "vit") + model.safetensors
                                             (ViTModel or ViTForImageClassification)
    a timm VisionTransformer state dict      one .safetensors file (timm's names: blocks.0.attn.qkv, ...)

Both put a position embedding on the class token too; pixformer's class token has none, so that row
is added to the class token (the same sum enters the first block). Each returns pixformer's tensor
names, the source's grid of patches and its patch size; `engine.checkpoint.init_from` loads them like
a run's weights (a table on another grid is resampled, another patch size is converted).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import PixformerError
from ..files import read_json_object

# transformers' names (after the "vit." prefix of ViTForImageClassification) -> pixformer's
_HF = [(r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
       (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
       (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
       (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.0."),
       (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.2."),
       (r"layernorm\.", "norm."), (r"classifier\.", "head.")]
# timm's names -> pixformer's
_TIMM = [(r"blocks\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.0."), (r"blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.2.")]


def _rename(tensors: dict[str, Tensor], rules) -> dict[str, Tensor]:
    out = {}
    for key, value in tensors.items():
        for pattern, repl in rules:
            key = re.sub("^" + pattern, repl, key)
        out[key] = value
    return out


def _split_positions(pos: Tensor, cls: Tensor | None, grid: tuple[int, int] | None) -> tuple[Tensor, Tensor | None]:
    """A (1, [1 +] N, D) position embedding -> the (rows, cols, D) table of the patches, and the class
    token with its position row added. `grid`: the source's patch grid, when it is known (without it,
    a square grid, the only one a bare state dict implies; anything else is refused)."""
    pos = pos[0]
    n = pos.shape[0]
    square = lambda m: math.isqrt(m) ** 2 == m                                  # noqa: E731
    has_cls_row = cls is not None and (n == grid[0] * grid[1] + 1 if grid else square(n - 1))
    if has_cls_row:
        cls, pos, n = cls + pos[:1], pos[1:], n - 1
    if grid is None:
        if not square(n):
            raise PixformerError(f"a position embedding of {n} patches without its image size: its grid is unknown")
        grid = (math.isqrt(n), math.isqrt(n))
    if n != grid[0] * grid[1]:
        raise PixformerError(f"a position embedding of {n} patches does not fit the {grid[0]}x{grid[1]} grid")
    return pos.reshape(*grid, -1), cls


def _patch_embed(weight: Tensor) -> tuple[Tensor, int]:
    """A (D, C, p, p) convolution -> pixformer's (D, p*p*C) linear map in its (p1 p2 c) layout, and p."""
    D, C, p, q = weight.shape
    if p != q:
        raise PixformerError(f"a {p}x{q} patch embedding is not square")
    return weight.permute(0, 2, 3, 1).reshape(D, p * p * C), p


def from_transformers(folder: Path) -> tuple[dict[str, Tensor], tuple[int, int], int]:
    from safetensors.torch import load_file
    config = read_json_object(folder / "config.json", "a transformers model's config")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PixformerError(f"{folder}: no .safetensors weights (save the model with safe_serialization=True)")
    raw = {k: v for f in files for k, v in load_file(f).items()}
    raw = {k.removeprefix("vit."): v for k, v in raw.items() if not k.startswith(("pooler.", "vit.pooler."))}
    p = config["patch_size"]
    size = config["image_size"]
    grid = (size // p, size // p) if isinstance(size, int) else (size[0] // p, size[1] // p)
    out = _rename({k: v for k, v in raw.items()
                   if not k.startswith("embeddings.") and ".attention.attention." not in k}, _HF)
    layers = sorted({int(m[1]) for k in raw if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        a = f"encoder.layer.{i}.attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([raw[a + n + ".weight"] for n in ("query", "key", "value")])
        if a + "query.bias" in raw:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([raw[a + n + ".bias"] for n in ("query", "key", "value")])
    out["patch_embed.weight"], p = _patch_embed(raw["embeddings.patch_embeddings.projection.weight"])
    out["patch_embed.bias"] = raw["embeddings.patch_embeddings.projection.bias"]
    out["pos_table"], out["cls_token"] = _split_positions(raw["embeddings.position_embeddings"],
                                                          raw["embeddings.cls_token"], grid)
    return out, grid, p


def from_timm(file: Path) -> tuple[dict[str, Tensor], tuple[int, int], int]:
    from safetensors.torch import load_file
    raw = load_file(file)
    out = _rename({k: v for k, v in raw.items() if not k.startswith(("patch_embed.", "pos_embed", "cls_token"))}, _TIMM)
    out["patch_embed.weight"], p = _patch_embed(raw["patch_embed.proj.weight"])
    out["patch_embed.bias"] = raw["patch_embed.proj.bias"]
    table, cls = _split_positions(raw["pos_embed"], raw.get("cls_token"), None)
    out["pos_table"] = table
    if cls is not None:
        out["cls_token"] = cls
    return out, tuple(table.shape[:2]), p


def foreign_format(path: str | Path) -> str | None:
    """'transformers' or 'timm' when `path` holds such weights (checked from the config or the file's
    key names, without reading the tensors), None when it is neither; a transformers folder of
    another model type, or a .safetensors file without timm's ViT keys, is a clear error."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        kind = read_json_object(path / "config.json", "a transformers model's config").get("model_type")
        if kind != "vit":
            raise PixformerError(f"{path} holds a transformers {kind!r} model, not a ViT (model_type 'vit')")
        return "transformers"
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), "pt") as f:
                keys = set(f.keys())
        except (SafetensorError, OSError) as e:
            raise PixformerError(f"{path} is not a readable safetensors file ({e})") from None
        if not {"patch_embed.proj.weight", "pos_embed"} <= keys:
            raise PixformerError(f"{path} is not a timm VisionTransformer state dict (no patch_embed.proj.weight / "
                                 f"pos_embed; it has {sorted(keys)[:4]} ...)")
        return "timm"
    return None


def read_foreign(path: str | Path) -> tuple[dict[str, Tensor], tuple[int, int], int, str] | None:
    """Weights of a transformers ViT folder or a timm .safetensors file, as pixformer names them, with
    the source's grid, patch size and format; None when `path` is neither."""
    kind = foreign_format(path)
    if kind is None:
        return None
    try:
        return (*(from_transformers if kind == "transformers" else from_timm)(Path(path)), kind)
    except KeyError as e:
        raise PixformerError(f"{path}: a {kind} ViT without the tensor {e.args[0]!r}") from None
