"""`pixformer export`: a trained run as an ONNX graph, or as a folder in the Hugging Face Hub layout.

    pixformer export --checkpoint RUN --format onnx --out model.onnx    # + model.preprocess.json
    pixformer export --checkpoint RUN --format hf --out FOLDER          # config.json + model.safetensors

ONNX: the classifier (ViT / PiT, ConvMixer, a linear probe) exported by torch.onnx (its dynamo
exporter, the default opset) with a dynamic batch dimension: input `pixels`, float32 (batch, C, H, W),
already normalised; output `logits` (batch, classes), for a run trained with --eval-flip the average
of the image's and its mirror image's, as its evaluation scores them. The preprocessing is written
beside the graph, not baked into it, in `<name>.preprocess.json`: image size, channels, mean and std,
the resize, a locality-ablation run's pixel permutation and the class names. Why beside: the graph
then is the PyTorch model as evaluation runs it and nothing else (its outputs are compared one to
one), while the steps before it (decoding, resizing, channel conversion) have to happen outside the
graph anyway: with the mean and std beside them, all the preprocessing is in one place, in the form
every serving stack takes.

    pixels = (uint8 image (C, H, W) / 255 - mean[c]) / std[c]

Native-resolution runs (images packed at their own sizes), MAE and diffusion runs are refused in one
line: save those with --format hf.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from ..engine.checkpoint import weights_used
from ..errors import PixformerError, install_hint
from ..files import json_object_or_empty, output_folder, write_atomically, written
from .predict import load_for_inference, resize_of

FORMATS = ("onnx", "hf")
RESIZES = {"pil": "PIL bicubic to image_size (JPEGs first drafted at a reduced scale no smaller than it)",
           "torch": "antialiased bilinear to image_size (torch.nn.functional.interpolate, antialias=True, "
                    "align_corners=False), rounded and clipped to uint8"}


def export(checkpoint: Any, fmt: str, out: str | Path, weights: str = "auto", opset: int | None = None) -> list[Path]:
    """Export the run `checkpoint` (as `predict` takes it) in format `fmt` ('onnx' or 'hf') to `out`;
    returns the files (or folder) written."""
    if fmt == "onnx":
        return list(export_onnx(checkpoint, out, weights, opset))
    if fmt == "hf":
        if opset is not None:
            raise PixformerError("--opset is an ONNX setting; --format hf saves the weights as they are")
        from .hub import HubModel, hub_out, save_hub, write_hub
        if isinstance(checkpoint, (str, Path)) and Path(checkpoint).is_dir() and _is_run(checkpoint):
            return [save_hub(checkpoint, out, weights)]
        model, state, _ = load_for_inference(checkpoint, weights)       # a Hub folder or repository saved again
        hub = HubModel(config=_config_of(state))
        hub.module.load_state_dict(model.state_dict())
        return [write_hub(hub, hub_out(out))]
    raise PixformerError(f"unknown export format {fmt!r}; choose from {list(FORMATS)}")


def check_onnx_out(out: str | Path, opset: int | None) -> None:
    """One line for an --out that is not a .onnx name, that names files other than an earlier export's
    (those are replaced, as --format hf replaces its own folder; nothing else is), or for an opset that
    no onnx release defines."""
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise PixformerError(f"--out {out}: name the ONNX file with the .onnx suffix")
    side = out.with_suffix(".preprocess.json")
    if not _written_by_export(side):
        for path in (out, side):
            if path.exists() or path.is_symlink():
                raise PixformerError(f"--out {out}: {path} exists and is not an earlier export of pixformer's "
                                     "(remove it, or choose another name)")
    if opset is not None:
        try:
            import onnx
        except ImportError:
            raise PixformerError(f"ONNX export needs onnx and onnxscript: {install_hint('export')}") from None
        newest = onnx.defs.onnx_opset_version()
        if not 1 <= opset <= newest:
            raise PixformerError(f"--opset {opset}: ONNX opsets run from 1 to {newest} (this onnx's newest); "
                                 "leave it out for torch.onnx's default")


def _written_by_export(side: Path) -> bool:
    """Whether `side` is the preprocessing file export_onnx writes beside a graph."""
    written = json_object_or_empty(side)
    return written.get("input") == "pixels" and "model_name" in written


def _is_run(path: str | Path) -> bool:
    from ..engine.checkpoint import find_checkpoint
    return find_checkpoint(path) is not None


def _config_of(state: dict[str, Any]) -> dict[str, Any]:
    from .hub import hub_config
    return hub_config(state, state.get("weights", "model"))


def export_onnx(checkpoint: Any, out: str | Path, weights: str = "auto", opset: int | None = None) -> tuple[Path, Path]:
    """Write the classifier of `checkpoint` as ONNX to `out` (dynamic batch; input `pixels`, normalised
    float32 (batch, C, H, W); output `logits`) and its preprocessing to `<out stem>.preprocess.json`.
    Returns both paths."""
    from ..data.ablations import pixel_permutation
    from ..data.native import is_native
    from ..models.attention import set_attention_backend
    from ..tasks import task_of
    from ..tasks.classify import Classify
    check_onnx_out(out, opset)                                          # before the model is loaded
    model, state, name = load_for_inference(checkpoint, weights)
    task, tc = task_of(state), state["train_config"]
    if not isinstance(task, Classify):
        raise PixformerError(f"{name} is a {task.name} run: ONNX export takes a classifier (classify or probe); "
                             "--format hf saves any run")
    if is_native(tc):
        raise PixformerError(f"{name} is a native-resolution run (images packed at their own sizes), which an ONNX "
                             "graph of fixed-size images does not reproduce; --format hf saves it")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter writes through it)
    except ImportError:
        raise PixformerError(f"ONNX export needs onnx and onnxscript: {install_hint('export')}") from None
    out = Path(out)
    output_folder(out.absolute().parent)
    facts = task.facts
    C, (H, W) = facts.in_chans, facts.img_size
    model = set_attention_backend(model.float().eval(), "math")         # plain matmuls and softmax: any runtime
    model = task.evaluated(model)                                       # --eval-flip: the mirror in the graph
    example = torch.randn(2, C, H, W)
    batch = torch.export.Dim("batch", min=1)
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [log.level for log in logs]
    try:
        for log in logs:                         # not the exporter's notes on operators this model does not use,
            log.setLevel(logging.CRITICAL)       # nor the version converter's traceback (checked below)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), input_names=["pixels"],
                                        output_names=["logits"], opset_version=opset, dynamo=True, verbose=False)
    except Exception as e:                       # the exporter's errors are long: the first line says what
        raise PixformerError(f"ONNX export of {state['model_name']} failed: {str(e).strip().splitlines()[0]}") from None
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    wrote = program.model.opset_imports.get("")
    if opset is not None and wrote != opset:     # the converter keeps the graph as it was where it cannot go back
        raise PixformerError(f"--opset {opset}: torch.onnx cannot convert {state['model_name']} down to opset "
                             f"{opset} (an operator it uses has no version that old); give a higher one, or leave it "
                             f"out ({wrote})")
    with written(out) as tmp:                    # whole or not at all
        program.save(str(tmp))
    perm = pixel_permutation(tc, H, W)
    side = out.with_suffix(".preprocess.json")
    write_atomically(side, json.dumps({
        "model_name": state["model_name"], "input": "pixels", "output": "logits",
        "input_shape": ["batch", C, H, W], "dtype": "float32",
        "channels": "RGB" if C == 3 else "L (PIL's luma of the RGB image)",
        "image_size": [H, W],
        "resize": RESIZES[resize_of(state)],
        "normalise": "pixels = (uint8 image / 255 - mean[channel]) / std[channel]",
        "mean": facts.mean, "std": facts.std,
        "pixel_permutation": None if perm is None else perm.tolist(),
        "pixel_permutation_note": "if set: image.reshape(C, H*W)[:, perm].reshape(C, H, W) before normalising",
        "classes": facts.classes, "probabilities": "softmax(logits)",
        "mirror_averaged": task.cfg.eval_flip,
        "mirror_averaged_note": "if true: the graph averages the logits of the image and its mirror image, "
                                "as the run's evaluation does (--eval-flip); nothing to do outside it",
        "weights": weights_used(state, weights),
    }, indent=1))
    return out, side
