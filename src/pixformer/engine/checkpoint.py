"""Checkpoints without pickles: tensors in safetensors, everything else in JSON, written atomically.

    RUN/checkpoint/
        model.safetensors      weights (loadable anywhere safetensors is)
        ema.safetensors        EMA weights, when training keeps them
        optimizer.safetensors  optimizer state tensors
        state.json             train config, model spec, step, optimizer hyper-parameters, data facts

A new checkpoint is written to a temporary folder and swapped in by renames; a run killed at any
moment leaves either the old or the new checkpoint whole (`checkpoint.old` is picked up if the kill
fell between the two renames). A write that fails (a full disk, a read-only folder) is one error line,
and the previous checkpoint stays.

state.json records the size and SHA-256 of every tensor file beside it ("checksums"; `sha256sum`
checks them too). A checkpoint is verified when it is chosen (find_checkpoint) and its files when they
are loaded, each file hashed once per process while it is unchanged: a damaged checkpoint/ is passed
over for a whole checkpoint.old, and a damaged file is never read into a model. Checkpoints written
before checksums existed still load (their safetensors files are checked for truncation only).
"""
from __future__ import annotations

import errno
import hashlib
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

from ..errors import PixformerError
from ..files import as_created, json_object_or_empty, read_json_object
from ..models.pos_embed import resample_positions
from ..models.registry import ARCHITECTURES, build
from ..progress import notice
from .flexi import pi_resize
from .imports import read_foreign
from .rundir import LOCK, claim


def _tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def optimizer_to_files(opt: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors = {f"{i}.{name}": v for i, st in sd["state"].items() for name, v in st.items()
               if isinstance(v, torch.Tensor)}
    scalars = {f"{i}.{name}": v for i, st in sd["state"].items() for name, v in st.items()
               if not isinstance(v, torch.Tensor)}
    return _tensors(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict (plain, keyed by parameter position) from its checkpoint files."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], model: nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict | None = None, ema: nn.Module | None = None) -> Path:
    """Write a checkpoint of `model` (a module or its state dict), the optimizer (or its state dict),
    the EMA weights and `state` (JSON, with the tensor files' checksums added) into RUN/checkpoint,
    atomically. A failed write (a full disk, a read-only folder) is one error line naming the folder; the
    previous checkpoint stays whole."""
    run_dir = Path(run_dir)
    final, old = run_dir / "checkpoint", run_dir / "checkpoint.old"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint.tmp-"))
    except OSError as e:
        raise _unwritten(final, e) from None
    try:
        state, checksums = dict(state), {}

        def put(name: str, tensors: dict[str, torch.Tensor]):      # one file at a time: one copy in memory
            save_file(tensors, tmp / name)
            size = (tmp / name).stat().st_size
            if (problem := _safetensors_problem(tmp / name, size)) is not None:     # a short write not reported
                raise OSError(errno.EIO, f"{name} came out {problem}")
            checksums[name] = {"bytes": size, "sha256": _sha256(tmp / name)}

        put("model.safetensors", _tensors(model if isinstance(model, dict) else model.state_dict()))
        if ema is not None:
            put("ema.safetensors", _tensors(ema.state_dict()))
        if optimizer is not None:
            tensors, state["optimizer"] = optimizer_to_files(optimizer)
            put("optimizer.safetensors", tensors)
            del tensors
        state["checksums"] = checksums
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        as_created(tmp)
        if final.exists():
            if old.exists() and checkpoint_problem(final) is not None:
                shutil.rmtree(final)             # a damaged checkpoint/ beside the whole one this run resumed from
            else:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:
        if old.exists() and not final.exists():  # failed between the renames: the previous one back in its place
            try:
                os.replace(old, final)
            except OSError:
                pass                             # it stays whole as checkpoint.old, which find_checkpoint reads
        raise _unwritten(final, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _unwritten(final: Path, e: Exception) -> PixformerError:
    why = (e.strerror or str(e)) if isinstance(e, OSError) else \
        str(e).removeprefix("Error while serializing: ").removeprefix("I/O error: ")     # safetensors' words
    kept = "the previous checkpoint is kept" if final.exists() or final.with_name("checkpoint.old").exists() \
        else "no checkpoint was written"
    return PixformerError(f"cannot write the checkpoint {final} ({why}); {kept}")


# ---- verification ---------------------------------------------------------------------------------
_verified: dict[tuple, str | None] = {}    # (file, its identity and size and mtime, expected) -> problem


def _sha256(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _safetensors_problem(path: Path, size: int) -> str | None:
    """For a file without a recorded checksum: whether its header reads and its length is the header's."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                return "damaged (no safetensors header)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"damaged (its safetensors header is unreadable: {e})"
    if 8 + n + end != size:
        return f"damaged (truncated: {size} bytes of {8 + n + end})" if size < 8 + n + end \
            else f"damaged ({size - 8 - n - end} bytes after its tensors)"
    return None


def file_problem(path: Path, expected: dict[str, Any] | None) -> str | None:
    """Why the tensor file `path` is not the one written ('model.safetensors is damaged (checksum
    mismatch)', '... is missing'), None when it is. `expected`: its entry in state.json's "checksums"
    (None for a checkpoint written before checksums). Each file is hashed once while it is unchanged."""
    try:
        st = path.stat()
    except OSError:
        return f"{path.name} is missing"
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, json.dumps(expected, sort_keys=True))
    if key not in _verified:
        if expected is None:
            why = _safetensors_problem(path, st.st_size)
        elif st.st_size != expected["bytes"]:
            why = f"damaged ({'truncated: ' if st.st_size < expected['bytes'] else ''}{st.st_size} bytes, " \
                  f"written as {expected['bytes']})"
        elif _sha256(path) != expected["sha256"]:
            why = "damaged (checksum mismatch)"
        else:
            why = None
        _verified[key] = None if why is None else f"{path.name} is {why}"
    return _verified[key]


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why the checkpoint folder `ckpt` cannot be used (state.json unreadable, a tensor file missing,
    truncated or failing its checksum), named from the folder: 'model.safetensors is damaged (checksum
    mismatch)'; None when it is whole."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except FileNotFoundError:
        return "state.json is missing"
    except (OSError, ValueError) as e:
        return f"state.json is unreadable ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("checksums", {}), dict):
        return "state.json is not a checkpoint's state"
    sums = state.get("checksums", {})
    names = ["model.safetensors"] + sorted(({*sums} | {p.name for p in ckpt.glob("*.safetensors")}) - {"model.safetensors"})
    for name in names:
        if (problem := file_problem(ckpt / name, sums.get(name))) is not None:
            return problem
    return None


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint to read: from a run folder, checkpoint/ (or checkpoint.old, left by a kill between
    the two renames of a save); or a checkpoint folder itself. None when there is none.
    The one chosen is verified (checkpoint_problem); a damaged checkpoint/ is passed over for a whole
    checkpoint.old, said in one line; with none whole, the damage is a one-line error."""
    path = Path(path)
    if (path / "state.json").exists() or (path.name in ("checkpoint", "checkpoint.old") and path.is_dir()):
        # the checkpoint folder itself
        candidates = [path] + ([path.with_name("checkpoint.old")] if path.name == "checkpoint" else [])
    else:
        candidates = [path / "checkpoint", path / "checkpoint.old"]
    candidates = [c for c in candidates if (c / "state.json").exists() or (c / "model.safetensors").exists()]
    damaged = []
    for cand in candidates:
        problem = checkpoint_problem(cand)
        if problem is None:
            for bad, why in damaged:                  # each said once by this process
                notice(f"{bad} is unreadable ({why}); using {cand.name}", once=True)
            return cand
        damaged.append((cand, problem))
    if not damaged:
        return None
    bad, why = damaged[0]
    if len(damaged) > 1:
        rest = f", and {damaged[1][0].name} is unreadable too ({damaged[1][1]})"
    else:
        rest = " and there is no checkpoint.old beside it" if bad.name == "checkpoint" else ""
    raise PixformerError(f"{bad}{os.sep}{why}: this checkpoint cannot be used{rest}")


def check_out_folder(out: str | Path) -> None:
    """A one-line error when a run's --out is a checkpoint folder or lies inside one (RUN/checkpoint):
    the saves of the run that owns it replace that folder whole, and with it whatever was put inside."""
    path = Path(os.path.abspath(out))           # '..' resolved as the shell would, links kept
    for folder in (path, *path.parents):
        if (folder / "state.json").is_file() and (folder / "model.safetensors").is_file():
            raise PixformerError(f"--out {out} lies inside the checkpoint folder {folder} of the run {folder.parent}, "
                                 f"which its saves replace whole: continue that run with --out {folder.parent} "
                                 "--resume, or give a new run a folder of its own")


def check_holds_no_other_files(out: str | Path) -> None:
    """A one-line error when a run's --out holds files but no run (a run writes its config.json first):
    the run's own files (config.json, metrics.jsonl, ...) would replace those of the same names."""
    path = Path(out)
    others = sorted(p.name for p in path.iterdir() if p.name != LOCK) if path.is_dir() else []
    if others and not _is_train_config(path / "config.json"):
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise PixformerError(f"--out {out} holds files that are not a pixformer run ({listed}); give the run an "
                             "empty or new folder")


def _is_train_config(path: Path) -> bool:
    """Whether `path` is the config.json a run writes (its TrainConfig)."""
    return {"model", "task", "data", "epochs", "out"} <= json_object_or_empty(path).keys()


# The fields of state.json that the loaders read, with their JSON types ("data.classes": within "data").
STATE_FIELDS = {"model": dict, "model.arch": str, "model.config": dict, "data": dict, "data.classes": list,
                "data.in_chans": int, "data.img_size": list, "data.mean": list, "data.std": list, "step": int,
                "train_config": dict}


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked for the fields the loaders read (STATE_FIELDS): a file that is
    not a JSON object, or lacks one of them, is one line naming the file and the field."""
    path = ckpt / "state.json"
    state = read_json_object(path, "a checkpoint's state (an object)")
    for name, kind in STATE_FIELDS.items():
        value = state
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            what = "lacks the field" if value is None else f"has a {type(value).__name__} for the {kind.__name__} field"
            raise PixformerError(f"{path} {what} {name!r}: not a pixformer checkpoint's state")
    return state


def _recorded(path: Path) -> dict[str, Any] | None:
    """The checksum state.json beside `path` records for it; None when there is none to check against."""
    try:
        sums = json.loads((path.parent / "state.json").read_text()).get("checksums", {})
        return sums.get(path.name) if isinstance(sums, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file of a checkpoint is checked against its recorded checksum
    first (once per process while unchanged), so that numbers from a damaged file are never used."""
    path = Path(path)
    expected = _recorded(path)
    if expected is not None and (problem := file_problem(path, expected)) is not None:
        raise PixformerError(f"{path.parent}{os.sep}{problem}: its bytes are not those written (a disk or copy fault); "
                             "restore it, or resume from an earlier checkpoint")
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
    load_weights(model, ckpt / f"{weights_used(state, weights)}.safetensors")
    return model.eval(), state


def check_weights(weights: str) -> str:
    """`weights` if it is 'auto', 'model' or 'ema'; else one line naming it."""
    if weights not in ("auto", "model", "ema"):
        raise PixformerError(f"--weights must be auto, model or ema, got {weights!r}")
    return weights


def weights_used(state: dict[str, Any], weights: str = "auto") -> str:
    """'model' or 'ema': the weights `weights` ('auto', 'model', 'ema') picks from a run whose state.json
    is `state` ('auto': the EMA weights when the run kept them, as its state records); one line when
    `weights` is none of those, or asks for EMA weights the run did not keep."""
    check_weights(weights)
    kept = state.get("weights", "model")
    if weights == "ema" and kept != "ema":
        raise PixformerError("this run kept no EMA weights (it trained without --ema-decay): use --weights model")
    return kept if weights == "auto" else weights


def init_from(model: nn.Module, path: str | Path, fresh: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Start `model` from a trained run's weights (EMA weights when it kept them), or from a transformers
    ViT folder or a timm ViT state dict (engine/imports.py), matched by name:
    a key may also match with or without an `encoder.` prefix, so an MAE run's encoder starts a
    classifier or a probe. A learned position table trained on another grid is resampled bilinearly,
    a patch embedding of another patch size is converted (FlexiViT's pseudo-inverse resize).
    Returns what was loaded, what the run had that the model does not use (e.g. an MAE decoder) and
    what the model has that the run lacks (e.g. a new head; a classifier head for another number of
    classes is left new too, as is every key starting with one of `fresh`); a tensor of another shape
    (another width) is an error naming the keys."""
    ckpt, foreign = find_checkpoint(path), None
    if ckpt is not None:
        kept = weights_used(json.loads((ckpt / "state.json").read_text()))     # its EMA weights where it kept them
        source = load_tensors(ckpt / f"{kept}.safetensors")
    elif (foreign := read_foreign(path)) is not None:
        source = foreign[0]
    else:
        raise PixformerError(f"--init {path}: not a pixformer run (state.json and model.safetensors), a transformers "
                             "ViT folder (config.json and safetensors) or a timm ViT state dict (.safetensors)")
    own = model.state_dict()
    loaded, new, used, mismatched, converted = {}, [], set(), [], []
    for key, target in own.items():
        name = next((k for k in (key, f"encoder.{key}", key.removeprefix("encoder.")) if k in source), None)
        if name is None or key.startswith(fresh):
            new.append(key)
            continue
        value = source[name]
        table = key.endswith(("pos_table", "pos_rows", "pos_cols")) and value.ndim == target.ndim \
            and value.shape[-1] == target.shape[-1] and value.shape != target.shape
        if table and _owner(model, key).cfg.pos_coords == "absolute":     # a row is a place: keep those both have
            value = _overlap(value, target)
        elif table:                                                        # bilinearly, as the model samples it
            value = resample_positions(value, tuple(target.shape[:-1]))
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
    from ..layout import check_grid
    from ..settings import require
    require("patch_size", patch, patch >= 1, "at least 1")
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise PixformerError(f"no checkpoint in {path} (expected state.json and model.safetensors)")
    state = read_state(ckpt)
    if state["model"]["arch"] != "vit":
        raise PixformerError(f"{path} holds a {state['model']['arch']} model; patch-size conversion is for ViT / PiT")
    if state["model"]["config"].get("stem", "linear") != "linear":
        raise PixformerError(f"{path} embeds patches with a convolutional stem (stem='conv'); patch-size conversion "
                             "resizes a linear patch embedding only")
    cfg = {**state["model"]["config"], "patch_size": patch}
    old_patch = state["model"]["config"]["patch_size"]
    check_grid(tuple(cfg["img_size"]), patch)                             # the new patch must tile the training size
    with claim(out):                                                     # no other process writes into `out` meanwhile
        if find_checkpoint(out) is not None:
            raise PixformerError(f"{out} already holds a checkpoint; choose another --out")
        return _convert(ckpt, state, cfg, old_patch, patch, mode, path, out)


def _convert(ckpt: Path, state: dict[str, Any], cfg: dict[str, Any], old_patch: int, patch: int, mode: str,
             path: str | Path, out: str | Path) -> dict[str, Any]:
    """convert_patch_size's work, once `out` is held."""
    from ..models.registry import model_name
    C = cfg["in_chans"]

    def converted(file: Path) -> nn.Module:
        tensors = load_tensors(file)
        tensors["patch_embed.weight"] = pi_resize(tensors["patch_embed.weight"], C, old_patch, patch, mode)
        model = build("vit", cfg)
        sizes = {"pos_table": model.pos_grid, "pos_rows": model.pos_grid[:1], "pos_cols": model.pos_grid[1:]}
        for name in sizes.keys() & tensors.keys():
            tensors[name] = resample_positions(tensors[name], sizes[name])
        return load_state(model, tensors, file)

    model = converted(ckpt / "model.safetensors")
    ema = converted(ckpt / "ema.safetensors") if (ckpt / "ema.safetensors").exists() else None
    state = {k: v for k, v in state.items() if k not in ("optimizer", "running")}
    state.update(model={"arch": "vit", "config": cfg}, model_name=model_name(model),
                 converted_from={"run": str(path), "patch_size": old_patch, "resize": mode})
    save_checkpoint(out, state, model, None, ema)
    return state
