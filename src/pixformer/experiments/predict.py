"""Top-k classes of any images with a trained classifier: `pixformer predict` and `pixformer.predict`.

    pixformer predict --checkpoint RUN photo.jpg photos/ 'shots/*.png'    # a table
    pixformer predict --checkpoint RUN photos/ --json                      # JSON Lines: an object an image
    pixformer predict --checkpoint RUN photos/ --csv                       # image,rank,class,index,probability

    pixformer.predict("runs/vit-n4", ["photo.jpg"], top_k=3)
    -> [{"image": "photo.jpg", "predictions": [{"class": "cat", "index": 3, "probability": 0.91}, ...]}]

An image becomes the model's input exactly as the run's evaluation makes it: decoded by the decode
cache's own `decode_image` (resized to the run's image size, or for a native-resolution run scaled down
to its --max-side and packed by the run's batcher), converted to the run's channels (RGB, or PIL's
luma for a one-channel run), permuted as a locality-ablation run's pixels were, normalised with the
run's mean and std, under the run's autocast precision, and classified as evaluation classifies it
(with its mirror image, the two logits averaged, for a run trained with --eval-flip). So a training
image is given the probabilities `eval` scores it with. Any mode PIL opens is read, as `decode_image` reads it.

`run` may be a run folder, its checkpoint/ folder, a folder in the Hub layout or a Hub repository id
(experiments/hub.py), a loaded `HubModel`, or a (model, state) pair.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import PixformerError
from ..progress import Progress
from ..settings import require

ImageLike = Any                 # a path (str or Path), a PIL image, a numpy array (H, W[, C]) or a tensor (C, H, W)
PROGRESS_FROM = 100             # images from which progress is shown


# ---- the model ------------------------------------------------------------------------------
def load_for_inference(run: Any, weights: str = "auto") -> tuple[nn.Module, dict[str, Any], str]:
    """(model in eval mode, the run's state, a name for messages) of anything `predict` takes as `run`."""
    from ..engine.checkpoint import check_weights, find_checkpoint, load_model
    check_weights(weights)
    if isinstance(run, tuple):
        model, state = run
        return model.eval(), state, state.get("model_name", type(model).__name__)
    if hasattr(run, "as_run"):                                           # a HubModel
        model, state = run.as_run()
        return model.eval(), state, state["model_name"]
    if not isinstance(run, (str, Path)):
        raise PixformerError("a run is a folder, a Hub repository id, a HubModel or (model, state); "
                             f"got {type(run).__name__}")
    if find_checkpoint(run) is not None:
        model, state = load_model(run, weights)
        return model, state, str(run)
    path = Path(run)
    # owner/name is a Hub id, unless the owner is a folder here (runs/x: a run folder that does not exist)
    repo_id = not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(run)) is not None and not path.parent.is_dir()
    if not (path / "config.json").is_file() and not repo_id:
        raise PixformerError(f"no checkpoint in {run} (expected a run folder with checkpoint/state.json, or a "
                             "folder of `pixformer export --format hf`)" if path.exists() else f"{run} does not exist")
    from .hub import load_hub
    model, state = load_hub(run).as_run()
    if weights not in ("auto", state["weights"]):
        raise PixformerError(f"{run} holds the run's {state['weights']} weights only (asked for --weights {weights})")
    return model.eval(), state, str(run)


class Predictor:
    """A classifier loaded once, with the run's preprocessing: `predict(images)` as often as wanted."""

    def __init__(self, run: Any, weights: str = "auto", device: str = "auto"):
        from ..data.ablations import pixel_permutation
        from ..data.native import batcher_for, is_native
        from ..models import token_layout
        from ..engine.perf import autocast_dtype
        from ..engine.runtime import pick_device
        from ..tasks import task_of
        from ..tasks.classify import Classify
        model, state, self.name = load_for_inference(run, weights)
        self.task, self.state = task_of(state), state
        if not isinstance(self.task, Classify):
            raise PixformerError(f"{self.name} is a {self.task.name} run, not a classifier (a classify or probe run)")
        self.device = pick_device(device)
        self.model = self.task.evaluated(model.to(self.device).eval())    # with the run's --eval-flip
        tc, facts = state["train_config"], self.task.facts
        self.classes, self.chans = list(facts.classes), facts.in_chans
        native = is_native(tc)
        self.size = None if native else tuple(facts.img_size)                # (H, W) of a square run
        self.max_side = tc.get("max_side") if native else None
        self.batcher = batcher_for(tc, *token_layout(model), self.device)
        self.perm = None if native else pixel_permutation(tc, *self.size)
        self.amp = autocast_dtype(tc.get("precision", "auto"), self.device)
        self.resized_as = resize_of(state)

    def read(self, image: ImageLike) -> Tensor:
        """One image as the run's evaluation holds it: uint8 (C, H, W)."""
        return read_image(image, self.size, self.max_side, self.chans, self.resized_as)

    @torch.no_grad()
    def probabilities(self, images: list[Tensor]) -> Tensor:
        """Class probabilities (B, classes) of images read by `read`."""
        from ..data.ablations import apply_permutation
        if self.batcher is not None:
            x = self.batcher(images, self.task.inputs).to(self.device)
        else:
            x = self.task.inputs(apply_permutation(torch.stack(images), self.perm).to(self.device))
        amp = self.amp
        with torch.autocast(device_type=self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = self.model(x).float()                                  # (B, classes)
        return logits.softmax(-1).cpu()

    def iter_predict(self, images: Iterable[ImageLike], top_k: int = 5, batch_size: int = 64,
                     skip_bad_images: bool = False, progress: bool | None = None) -> Iterator[dict[str, Any]]:
        """One result a readable image, in order, made batch by batch (see `predict`); the arguments are
        checked at once, the images read and predicted as the results are asked for."""
        items = list(images)
        if not items:
            raise PixformerError("no images to predict")
        require("top_k", top_k, top_k >= 1, "at least 1")
        require("batch_size", batch_size, batch_size >= 1, "at least 1")
        show = len(items) >= PROGRESS_FROM if progress is None else progress
        return self._results(items, min(top_k, len(self.classes)), batch_size, skip_bad_images,
                             Progress(len(items), "predicting", show=show))

    def _results(self, items: list[ImageLike], k: int, batch_size: int, skip_bad_images: bool,
                 progress) -> Iterator[dict[str, Any]]:
        from ..data.cache import worker_count
        with progress, ThreadPoolExecutor(max_workers=min(8, worker_count(None))) as pool:
            for start in range(0, len(items), batch_size):
                chunk = items[start: start + batch_size]
                read, kept = [], []
                for i, got in enumerate(pool.map(self._read_or_error, chunk)):
                    name = image_name(chunk[i], start + i)
                    if isinstance(got, Tensor):
                        read.append(got)
                        kept.append(name)
                    elif skip_bad_images:
                        print(f"pixformer: skipped {name}: {got}", file=sys.stderr, flush=True)
                    else:
                        raise PixformerError(f"cannot read {name} ({got}); --skip-bad-images leaves such images out")
                if read:
                    top = self.probabilities(read).topk(k, dim=1)
                    for name, p, c in zip(kept, top.values.tolist(), top.indices.tolist()):
                        yield {"image": name, "predictions": [{"class": self.classes[j], "index": j, "probability": q}
                                                              for q, j in zip(p, c)]}
                progress.update(len(chunk))

    def _read_or_error(self, image: ImageLike) -> Tensor | str:
        from ..data.cache import failure
        try:
            return self.read(image)
        except PixformerError as e:
            return str(e)
        except Exception as e:                 # PIL raises many types for a corrupt file
            return failure(e)

    def predict(self, images: ImageLike | Iterable[ImageLike], top_k: int = 5, batch_size: int = 64,
                skip_bad_images: bool = False, progress: bool | None = None) -> list[dict[str, Any]]:
        """See `predict`."""
        return list(self.iter_predict(gather(images), top_k, batch_size, skip_bad_images, progress))


def predict(run: Any, images: ImageLike | Iterable[ImageLike], top_k: int = 5, *, batch_size: int = 64,
            device: str = "auto", weights: str = "auto", skip_bad_images: bool = False,
            progress: bool | None = None) -> list[dict[str, Any]]:
    """The `top_k` most probable classes (at most the class count) of each image with a trained classifier.

    run: a run folder or its checkpoint/, a folder in the Hub layout, a Hub repository id, a HubModel,
        or a (model, state) pair as load_model returns.
    images: one or a list of paths (image files; folders, searched recursively; glob patterns), PIL
        images, numpy arrays (H, W) or (H, W, C) as PIL reads them, or uint8 tensors (C, H, W).
    weights: 'model', 'ema' or 'auto' (EMA weights when the run kept them).
    skip_bad_images: leave out an image that cannot be read (said on stderr) instead of stopping.
    progress: a bar (or plain lines when stderr is not a terminal); None: from 100 images.

    Returns one dict an image, in order: {"image": its path (or its position for an image given as
    an object), "predictions": [{"class": name, "index": class index, "probability": p}, ...]},
    most probable first."""
    return Predictor(run, weights, device).predict(images, top_k, batch_size, skip_bad_images, progress)


# ---- images -----------------------------------------------------------------------------------
def gather(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """`images` as a list, paths expanded (find_images) in the order given, objects kept as they are."""
    if isinstance(images, (str, Path, np.ndarray, Tensor)) or hasattr(images, "getbands"):   # one (PIL: getbands)
        images = [images]
    out, paths = [], []
    for im in images:
        if isinstance(im, (str, Path)):
            paths.append(im)
            continue
        out += find_images(paths) if paths else []
        paths = []
        out.append(im)
    return out + (find_images(paths) if paths else [])


def find_images(paths: Iterable[str | Path]) -> list[str]:
    """Image files from files, folders (searched recursively, image extensions only) and glob patterns,
    in the order given (a folder's and a pattern's sorted), each once. A file named as it is is read
    whatever its extension; a path that does not exist, a pattern that matches nothing and a folder
    without images are one-line errors."""
    from ..data.sources import IMAGE_EXTS, scan_folder
    found: list[str] = []
    for p in map(str, paths):
        pattern = not os.path.exists(p) and glob.has_magic(p)
        matches = sorted(glob.glob(p, recursive=True)) if pattern else [p]
        if pattern and not matches:
            raise PixformerError(f"no file matches {p}")
        files = []
        for m in matches:
            if os.path.isdir(m):
                inside = [os.path.join(m, rel) for rel, _ in scan_folder(Path(m))]   # as a data folder is read
                if not inside and not pattern:
                    raise PixformerError(f"{m} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
                files += inside
            elif os.path.isfile(m):
                if not pattern or os.path.splitext(m)[1].lower() in IMAGE_EXTS:
                    files.append(m)
            else:
                raise PixformerError(f"{m} does not exist")
        if not files:
            raise PixformerError(f"{p} matches no images ({', '.join(sorted(IMAGE_EXTS))})")
        found += files
    return list(dict.fromkeys(found))


def image_name(image: ImageLike, position: int) -> str | int:
    return str(image) if isinstance(image, (str, Path)) else position


def resize_of(state: dict[str, Any]) -> str:
    """How the run's images were brought to its size: "pil" (an image folder or dataset: the decode
    cache's PIL bicubic) or "torch" (a named dataset's arrays: augment.resize, antialiased bilinear)."""
    from ..data.sources import NAMED_SOURCES
    return "torch" if state["data"].get("source") in NAMED_SOURCES else "pil"


def read_image(image: ImageLike, size: tuple[int, int] | None, max_side: int | None, chans: int,
               resized_as: str = "pil") -> Tensor:
    """An image as a run's evaluation holds it, uint8 (chans, H, W): decoded by the decode cache's
    `decode_image` (any mode, 16-bit images scaled to 8 bits), resized to `size` as the run's images
    were (`resized_as`, see resize_of), else scaled down to `max_side`, then made one channel (PIL's
    luma) if `chans` is 1. An image given as an object goes through decode_image too, as a lossless TIFF."""
    from PIL import Image

    from ..data.cache import decode_image
    from ..data.augment import resize
    if chans not in (1, 3):
        raise PixformerError(f"the run takes {chans}-channel images; predict reads 1 (grey) or 3 (RGB)")
    src = str(image) if isinstance(image, (str, Path)) else encoded(as_pil(image))
    if resized_as == "torch" and size is not None:                          # a named dataset's resize
        rgb = resize(torch.from_numpy(decode_image(src, None, None))[None], size)[0].numpy()
    else:
        rgb = decode_image(src, size, max_side)                             # (3, H, W) uint8
    if chans == 3:
        return torch.from_numpy(rgb)
    grey = Image.fromarray(rgb.transpose(1, 2, 0)).convert("L")
    return torch.from_numpy(np.asarray(grey, dtype=np.uint8).copy())[None]  # (1, H, W)


def as_pil(image: ImageLike):
    """A PIL image of a PIL image, a numpy array (H, W) / (H, W, C), or a tensor (C, H, W)."""
    from PIL import Image
    if hasattr(image, "getbands"):
        return image
    if isinstance(image, Tensor):
        if image.ndim != 3:
            raise PixformerError(f"a tensor image is (C, H, W), got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.dtype == np.float64:
            image = image.astype(np.float32)
        try:
            return Image.fromarray(image)
        except TypeError as e:
            raise PixformerError(f"an array of shape {image.shape} and dtype {image.dtype} is no image ({e})") from None
    raise PixformerError(f"an image is a path, a PIL image, a numpy array or a tensor; got {type(image).__name__}")


def encoded(im) -> bytes:
    """`im` as TIFF bytes, lossless in every mode TIFF holds (16-bit and float ones too); the few it
    does not (RGBX, HSV, premultiplied alpha) made RGB first, as decode_image would make them."""
    if im.mode in ("RGBX", "HSV", "La", "RGBa"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="TIFF")
    return buf.getvalue()


# ---- the command ------------------------------------------------------------------------------
def format_table(results: list[dict[str, Any]]) -> str:
    """A readable table: an image a line, its classes with probabilities, most probable first."""
    width = max(len("image"), *(len(str(r["image"])) for r in results))
    k = max(len(r["predictions"]) for r in results)
    lines = [f"{'image':<{width}}  top-{k} (probability)"]
    for r in results:
        lines.append(f"{str(r['image']):<{width}}  " + "   ".join(f"{p['class']} {100 * p['probability']:.1f}%"
                                                                for p in r["predictions"]))
    return "\n".join(lines)


def predict_command(checkpoint: str, paths: list[str], top_k: int = 5, batch_size: int = 64, device: str = "auto",
                    weights: str = "auto", as_json: bool = False, as_csv: bool = False,
                    skip_bad_images: bool = False) -> int:
    """`pixformer predict`: a table (default), JSON Lines (--json: one object an image, printed as each
    batch is done) or CSV (--csv: a row per image and rank) on stdout."""
    if as_json and as_csv:
        raise PixformerError("choose one of --json and --csv")
    images = find_images(paths)
    predictor = Predictor(checkpoint, weights, device)
    results, n = predictor.iter_predict(images, top_k, batch_size, skip_bad_images), 0
    if as_json:
        for n, r in enumerate(results, 1):
            print(json.dumps(r), flush=True)
    elif as_csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["image", "rank", "class", "index", "probability"])
        for n, r in enumerate(results, 1):
            out.writerows([r["image"], rank, p["class"], p["index"], f"{p['probability']:.6g}"]
                          for rank, p in enumerate(r["predictions"], 1))
            sys.stdout.flush()
    else:
        done = list(results)
        if done:
            print(format_table(done))
        n = len(done)
    if n == 0:
        raise PixformerError(f"none of the {len(images)} images could be read")
    return 0
