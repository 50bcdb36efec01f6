"""Models by name. Sizes are data: a table from size letter to depth / width / heads.

    vit-t/2     ViT-Tiny with 2x2 patches
    pit-s       ViT-Small with 1x1 patches: the Pixel Transformer (same as vit-s/1)
    vit-d4w64/2 a run's printed name for a size of no letter: depth 4, width 64 (heads: width / 64, or
                hH: vit-d4w128h4/2)
    convmixer-256/8   ConvMixer of width 256 and depth 8 (kernel_size and patch_size are settings)
    dit-s/2     DiT-S with 2x2 patches (diffusion); dit-l/1 is the PiT paper's pixel-token DiT-L
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from typing import Any, Callable

from torch import nn

from ..errors import PixformerError
from ..settings import check_type
from .convmixer import ConvMixer, ConvMixerConfig
from .dit import DiT, DiTConfig
from .mae import MAEConfig, MaskedAutoencoder
from .probe import LinearProbe, ProbeModelConfig
from .vit import ViTConfig, VisionTransformer

# size letter -> (depth, width, heads). T/S/B/L as in ViT / DeiT; N is pixformer's CPU-sized model.
VIT_SIZES: dict[str, dict[str, int]] = {
    "n": dict(depth=6, dim=128, heads=4),
    "t": dict(depth=12, dim=192, heads=3),
    "s": dict(depth=12, dim=384, heads=6),
    "b": dict(depth=12, dim=768, heads=12),
    "l": dict(depth=24, dim=1024, heads=16),
}
VIT_PATCHES = (2, 4, 8, 16)  # listed names; any patch size parses
# DiT's sizes: S, B, L as ViT's (the DiT paper's), its XL, and pixformer's CPU-sized n and t
DIT_SIZES: dict[str, dict[str, int]] = {**VIT_SIZES, "xl": dict(depth=28, dim=1152, heads=16)}

# Each architecture: (config class, model class). Checkpoints store the architecture key and config.
# NAMED: those a model name builds (their settings are --model-args); the others wrap a named model
# for a task (MAE: an encoder and a decoder; a linear probe) and are built by that task.
ARCHITECTURES: dict[str, tuple[type, type]] = {"vit": (ViTConfig, VisionTransformer),
                                                "convmixer": (ConvMixerConfig, ConvMixer),
                                                "dit": (DiTConfig, DiT),
                                                "mae": (MAEConfig, MaskedAutoencoder),
                                                "probe": (ProbeModelConfig, LinearProbe)}
NAMED = ("vit", "convmixer", "dit")
# Each name family: regex -> function(match) -> (architecture, config fields).
_FAMILIES: list[tuple[re.Pattern, Callable[[re.Match], tuple[str, dict[str, Any]]]]] = []
_LISTED: list[str] = []


def register_family(pattern: str, parse: Callable[[re.Match], tuple[str, dict[str, Any]]], names: list[str]):
    _FAMILIES.append((re.compile(pattern), parse))
    _LISTED.extend(names)


def _default_heads(dim: int) -> int:
    """The heads of a printed size without `hH`: width / 64 (ViT's head width), at least one, dividing it."""
    heads = max(dim // 64, 1)
    return heads if dim % heads == 0 else 1


def _size(size: str, table: dict[str, dict[str, int]]) -> dict[str, int]:
    """A size letter's depth, width and heads; or those of a size model_name prints for a model of no
    listed size, `dDwW` or `dDwWhH`: depth D, width W, and H heads (default W / 64, at least one)."""
    if size in table:
        return dict(table[size])
    depth, dim, heads = re.fullmatch(r"d(\d+)w(\d+)(?:h(\d+))?", size).groups()
    dim = int(dim)
    return dict(depth=int(depth), dim=dim, heads=int(heads) if heads else _default_heads(dim))


def _size_name(c, table: dict[str, dict[str, int]]) -> str:
    """The size part of model_name for config `c`: its letter, else dDwW (and hH where the heads are not
    the default for the width), which _size reads back."""
    letter = next((s for s, v in table.items() if (c.depth, c.dim, c.heads) == tuple(v.values())), None)
    return letter or f"d{c.depth}w{c.dim}" + (f"h{c.heads}" if c.heads != _default_heads(c.dim) else "")


_ANY_SIZE = r"d\d+w\d+(?:h\d+)?"
register_family(rf"vit-([ntsbl]|{_ANY_SIZE})/(\d+)", lambda m: ("vit", {**_size(m[1], VIT_SIZES), "patch_size": int(m[2])}),
                [f"vit-{s}/{p}" for s in VIT_SIZES for p in VIT_PATCHES])
register_family(rf"pit-([ntsbl]|{_ANY_SIZE})", lambda m: ("vit", {**_size(m[1], VIT_SIZES), "patch_size": 1}),
                [f"pit-{s}" for s in VIT_SIZES])
# convmixer-<width>/<depth>; kernel 5 and patch 2 by default (the authors' CIFAR-10 setting)
register_family(r"convmixer-(\d+)/(\d+)", lambda m: ("convmixer", {"dim": int(m[1]), "depth": int(m[2])}),
                ["convmixer-256/8", "convmixer-256/16"])
register_family(rf"dit-(n|t|s|b|l|xl|{_ANY_SIZE})/(\d+)", lambda m: ("dit", {**_size(m[1], DIT_SIZES), "patch_size": int(m[2])}),
                [f"dit-{s}/{p}" for s in DIT_SIZES for p in (1, 2, 4)])


def list_models() -> list[str]:
    """The registered model names (any other patch size also parses, e.g. 'vit-s/7')."""
    return list(_LISTED)


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """Model name -> (architecture, config fields), or a clear error suggesting close names."""
    key = name.strip().lower()
    for pattern, parse in _FAMILIES:
        m = pattern.fullmatch(key)
        if m:
            return parse(m)
    close = difflib.get_close_matches(key, _LISTED, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `pixformer models`"
    raise PixformerError(f"unknown model name {name!r}{hint}")


def setting(name: str, model_args: dict[str, Any], field: str) -> Any:
    """One config field of the model `name` builds with `model_args` over it (its patch size, depth):
    the args', else the name's, else the config class's default."""
    arch, fields = resolve(name)
    default = {f.name: f.default for f in dataclasses.fields(ARCHITECTURES[arch][0])}.get(field)
    return {**fields, **model_args}.get(field, default)


def build(arch: str, fields: dict[str, Any]) -> nn.Module:
    """Instantiate an architecture from config fields, rejecting unknown fields by name."""
    cfg_cls, model_cls = ARCHITECTURES[arch]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PixformerError(f"unknown setting(s) {unknown} for a {arch} model; valid: {sorted(known)}")
    return model_cls(cfg_cls(**fields))


def create_model(name: str, img_size: int | tuple[int, int] | None = None, num_classes: int | None = None,
                 in_chans: int | None = None, **overrides) -> nn.Module:
    """Build a model by name. `overrides` replace any config field (depth=4, pos_embed='sincos2d', ...).

    >>> model = create_model("pit-t", img_size=32, num_classes=100)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """
    arch, fields = resolve(name)
    given = dict(img_size=img_size, num_classes=num_classes, in_chans=in_chans)
    fields.update({k: v for k, v in given.items() if v is not None})
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return build(arch, fields)


# Config fields the data sets (never model settings a user passes): the image size, channels, classes.
DATA_FIELDS = ("img_size", "in_chans", "num_classes")


def check_model_args(name: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """`model_args` for the model `name`, or a clear error: a setting its architecture lacks, a value of
    the wrong type, or one its config dataclass refuses (checked before any data is loaded: the image
    size, which the data sets, is one token here)."""
    arch, fields = resolve(name)
    cfg_cls = ARCHITECTURES[arch][0]
    known = {f.name for f in dataclasses.fields(cfg_cls)} - set(DATA_FIELDS)
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise PixformerError(f"{name} ({arch}) has no setting(s) {unknown}; its settings are {sorted(known)}")
    hints = typing.get_type_hints(cfg_cls)
    merged = {**fields, **{k: check_type(k, v, hints[k]) for k, v in model_args.items()}}
    patch = merged.get("patch_size")
    cfg_cls(**merged, **({"img_size": (patch, patch)} if isinstance(patch, int) and patch >= 1 else {}))
    return dict(model_args)


def architecture(spec: dict[str, Any], name: str | None = None) -> tuple[str, dict[str, Any]]:
    """A model name and the model_args that build a saved model's architecture (`spec`: a checkpoint's
    "model", its arch and config; an MAE or probe run's encoder for theirs): `name` (the one the run
    started from) when it names that architecture, and every setting in which the saved model differs
    from what the name builds. The data's fields (image size, channels, classes) are left to the data."""
    arch, config = spec["arch"], spec["config"]
    if arch in ("mae", "probe"):
        arch, config = "vit", config["encoder"]
    try:
        same = name is not None and resolve(name)[0] == arch
    except PixformerError:
        same = False
    if not same:
        p = config.get("patch_size", 2)
        name = {"vit": "pit-n" if p == 1 else f"vit-n/{p}", "dit": f"dit-n/{p}",
                "convmixer": f"convmixer-{config.get('dim', 256)}/{config.get('depth', 8)}"}[arch]
    cfg_cls = ARCHITECTURES[arch][0]
    built = {**{f.name: f.default for f in dataclasses.fields(cfg_cls) if f.default is not dataclasses.MISSING},
             **resolve(name)[1]}
    args = {k: v for k, v in config.items()
            if k in built and k not in DATA_FIELDS and json.loads(json.dumps(built[k])) != v}
    return name, args


def model_name(model: nn.Module) -> str:
    """The name of the model actually built, after every setting: `vit-n/4` for vit-n/2 built with
    patch_size 4, `pit-t`, `vit-d4w64/2` for a ViT of no listed size (`vit-d4w128h4/2` where its heads are
    not width / 64), `convmixer-256/8`; the name builds the same architecture again."""
    c = model.cfg
    if isinstance(model, VisionTransformer):
        size = _size_name(c, VIT_SIZES)
        return f"pit-{size}" if c.patch_size == 1 else f"vit-{size}/{c.patch_size}"
    if isinstance(model, ConvMixer):
        return f"convmixer-{c.dim}/{c.depth}"
    if isinstance(model, DiT):
        return f"dit-{_size_name(c, DIT_SIZES)}/{c.patch_size}"
    if isinstance(model, (MaskedAutoencoder, LinearProbe)):
        return f"{'mae' if isinstance(model, MaskedAutoencoder) else 'probe'}-{model_name(model.encoder)}"
    return type(model).__name__.lower()


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint stores to rebuild `model`: its architecture key and config fields."""
    for arch, (_, model_cls) in ARCHITECTURES.items():
        if type(model) is model_cls:
            return {"arch": arch, "config": dataclasses.asdict(model.cfg)}
    raise PixformerError(f"{type(model).__name__} is not a registered architecture")
