"""Checkpoints without pickles: tensors in safetensors, everything else in JSON, written atomically.

    RUN/checkpoint/
        model.safetensors      weights (loadable anywhere safetensors is)
        ema.safetensors        EMA weights, when training keeps them
        optimizer.safetensors  optimizer state tensors
        state.json             train config, model spec, step, optimizer hyper-parameters, data facts

A new checkpoint is written to a temporary folder and swapped in by renames; a run killed at any
moment leaves either the old or the new checkpoint whole (`checkpoint.old` is picked up if the kill
fell between the two renames).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import PixformerError
from ..models.pos_embed import resample_table
from ..models.registry import ARCHITECTURES, build
from .flexi import pi_resize
from .imports import read_foreign


def _tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def optimizer_to_files(opt: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors = {f"{i}.{name}": v for i, st in sd["state"].items() for name, v in st.items()
               if isinstance(v, torch.Tensor)}
    scalars = {f"{i}.{name}": v for i, st in sd["state"].items() for name, v in st.items()
               if not isinstance(v, torch.Tensor)}
    return _tensors(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in meta["param_groups"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, st in state.items():          # parameters sharded by FSDP2 take their shard of each full tensor
        p = params[i]
        if isinstance(p, DTensor):
            st.update({k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                       for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == p.shape})
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], model: nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict | None = None, ema: nn.Module | None = None) -> Path:
    """Write a checkpoint of `model` (a module or its state dict), the optimizer (or its state dict),
    the EMA weights and `state` (JSON) into RUN/checkpoint, atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, old = run_dir / "checkpoint", run_dir / "checkpoint.old"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint.tmp-"))
    try:
        save_file(_tensors(model if isinstance(model, dict) else model.state_dict()), tmp / "model.safetensors")
        if ema is not None:
            save_file(_tensors(ema.state_dict()), tmp / "ema.safetensors")
        state = dict(state)
        if optimizer is not None:
            tensors, meta = optimizer_to_files(optimizer)
            save_file(tensors, tmp / "optimizer.safetensors")
            state["optimizer"] = meta
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint folder from a run folder or the checkpoint folder itself; None if there is none."""
    path = Path(path)
    for cand in (path, path / "checkpoint", path / "checkpoint.old"):
        if (cand / "state.json").exists() and (cand / "model.safetensors").exists():
            return cand
    return None


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PixformerError(f"{ckpt / 'state.json'} is unreadable ({e})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise PixformerError(f"{path} is not a readable safetensors file ({e})") from None


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors weight file into `model`; a file for another architecture is rejected
    with the mismatched keys named."""
    return load_state(model, load_tensors(Path(path)), path)


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Load `tensors` (read from `path`) into `model`, or name the keys that do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + ", ".join(
                f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:5]))
        raise PixformerError(f"checkpoint {path} does not fit this architecture: " + "; ".join(parts))
    model.load_state_dict(tensors)
    return model


def load_model(path: str | Path, weights: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a run or checkpoint folder; returns (model in eval mode, state).
    `weights`: 'model', 'ema' or 'auto' (EMA weights when the run kept them)."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise PixformerError(f"no checkpoint in {path} (expected state.json and model.safetensors)")
    state = read_state(ckpt)
    spec = state["model"]
    if spec["arch"] not in ARCHITECTURES:
        raise PixformerError(f"{ckpt} holds an unknown architecture {spec['arch']!r}")
    model = build(spec["arch"], spec["config"])
    use_ema = weights == "ema" or (weights == "auto" and (ckpt / "ema.safetensors").exists())
    load_weights(model, ckpt / ("ema.safetensors" if use_ema else "model.safetensors"))
    return model.eval(), state


def init_from(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Start `model` from a trained run's weights (EMA weights when it kept them), or from a transformers
    ViT folder or a timm ViT state dict (engine/imports.py), matched by name:
    a key may also match with or without an `encoder.` prefix, so an MAE run's encoder starts a
    classifier or a probe. A learned position table trained on another grid is resampled bilinearly,
    a patch embedding of another patch size is converted (FlexiViT's pseudo-inverse resize).
    Returns what was loaded, what the run had that the model does not use (e.g. an MAE decoder) and
    what the model has that the run lacks (e.g. a new head; a classifier head for another number of
    classes is left new too); a tensor of another shape (another width) is an error naming the keys."""
    ckpt, foreign = find_checkpoint(path), None
    if ckpt is not None:
        source = load_tensors(ckpt / ("ema.safetensors" if (ckpt / "ema.safetensors").exists() else "model.safetensors"))
    elif (foreign := read_foreign(path)) is not None:
        source = foreign[0]
    else:
        raise PixformerError(f"--init {path}: not a pixformer run (state.json and model.safetensors), a transformers "
                             "ViT folder (config.json and safetensors) or a timm ViT state dict (.safetensors)")
    own = model.state_dict()
    loaded, new, used, mismatched, converted = {}, [], set(), [], []
    for key, target in own.items():
        name = next((k for k in (key, f"encoder.{key}", key.removeprefix("encoder.")) if k in source), None)
        if name is None:
            new.append(key)
            continue
        value = source[name]
        table = key.endswith(("pos_table", "pos_rows", "pos_cols")) and value.ndim == target.ndim \
            and value.shape[-1] == target.shape[-1] and value.shape != target.shape
        if table and _owner(model, key).cfg.pos_coords == "absolute":     # a row is a place: keep those both have
            value = _overlap(value, target)
        elif table and key.endswith("pos_table"):
            value = resample_table(value.float(), tuple(target.shape[:2])).to(value.dtype)
        elif table:                                                        # a factorized table: along its axis
            value = resample_table(value.float()[:, None], (target.shape[0], 1))[:, 0].to(value.dtype)
        if value.shape != target.shape and key.endswith("patch_embed.weight") and value.ndim == 2 == target.ndim \
                and value.shape[0] == target.shape[0]:
            vit = _owner(model, key)
            C, p = vit.cfg.in_chans, math.isqrt(value.shape[1] // vit.cfg.in_chans)
            if p * p * C == value.shape[1]:                                 # another patch size: FlexiViT's resize
                value = pi_resize(value.float(), C, p, vit.cfg.patch_size).to(value.dtype)
                converted.append(f"{key} (patch {p} -> {vit.cfg.patch_size})")
        if value.shape != target.shape and key.endswith(("head.weight", "head.bias")):   # other classes: a new head
            new.append(key)
            continue
        if value.shape != target.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
            continue
        loaded[key] = value
        used.add(name)
    if mismatched:
        raise PixformerError(f"--init {path} does not fit this model (another width or patch size?): "
                             + ", ".join(mismatched[:4]) + (" ..." if len(mismatched) > 4 else ""))
    if not loaded:
        raise PixformerError(f"--init {path}: none of its tensors fits this model")
    model.load_state_dict({**own, **loaded})
    return {"loaded": sorted(loaded), "unused": sorted(set(source) - used), "new": sorted(new),
            "converted": converted, "format": foreign[3] if foreign else "pixformer"}


def _owner(model: nn.Module, key: str) -> nn.Module:
    """The ViT a position table or a patch-embedding weight (`key`) belongs to."""
    path = key.removesuffix("patch_embed.weight") if key.endswith("patch_embed.weight") else key.rpartition(".")[0]
    return model.get_submodule(path.rstrip("."))


def _overlap(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An absolute-coordinate table moved onto another grid: the rows (and columns) both grids have are
    `value`'s, the rest keep `target`'s own initialisation."""
    out = target.clone()
    common = tuple(slice(0, min(a, b)) for a, b in zip(value.shape[:-1], target.shape[:-1]))
    out[common] = value[common].to(out.dtype)
    return out


def summarize_keys(keys: list[str], most: int = 4) -> str:
    """A few key names, their first parts grouped: 'decoder_blocks.* (28), mask_token'."""
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    parts = [f"{h}.* ({n})" if n > 1 else h for h, n in groups.items()]
    return ", ".join(parts[:most]) + (" ..." if len(parts) > most else "") if parts else "none"


def convert_patch_size(path: str | Path, patch: int, out: str | Path, mode: str = "bilinear") -> dict[str, Any]:
    """Write to `out` a checkpoint of the ViT in `path` at patch size `patch`: the patch embedding
    resampled by FlexiViT's pseudo-inverse resize, the learned position table bilinearly to the new
    grid of the same image size, every other tensor as it is (model and EMA weights). The result
    evaluates like any run and starts new runs (--init); it is not a stopped run to resume."""
    from ..models.registry import model_name
    from ..models.vit import check_grid
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise PixformerError(f"no checkpoint in {path} (expected state.json and model.safetensors)")
    state = read_state(ckpt)
    if state["model"]["arch"] != "vit":
        raise PixformerError(f"{path} holds a {state['model']['arch']} model; patch-size conversion is for ViT / PiT")
    cfg = {**state["model"]["config"], "patch_size": patch}
    old_patch, C = state["model"]["config"]["patch_size"], cfg["in_chans"]
    check_grid(tuple(cfg["img_size"]), patch)                             # the new patch must tile the training size
    if find_checkpoint(out) is not None:
        raise PixformerError(f"{out} already holds a checkpoint; choose another --out")

    def converted(file: Path) -> nn.Module:
        tensors = load_tensors(file)
        tensors["patch_embed.weight"] = pi_resize(tensors["patch_embed.weight"], C, old_patch, patch, mode)
        model = build("vit", cfg)
        if "pos_table" in tensors:
            tensors["pos_table"] = resample_table(tensors["pos_table"], model.pos_grid)
        for name, n in (("pos_rows", model.pos_grid[0]), ("pos_cols", model.pos_grid[1])):
            if name in tensors:
                tensors[name] = resample_table(tensors[name][:, None], (n, 1))[:, 0]
        return load_state(model, tensors, file)

    model = converted(ckpt / "model.safetensors")
    ema = converted(ckpt / "ema.safetensors") if (ckpt / "ema.safetensors").exists() else None
    state = {k: v for k, v in state.items() if k not in ("optimizer", "running")}
    state.update(model={"arch": "vit", "config": cfg}, model_name=model_name(model),
                 converted_from={"run": str(path), "patch_size": old_patch, "resize": mode})
    save_checkpoint(out, state, model, None, ema)
    return state
