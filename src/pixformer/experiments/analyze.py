"""What a trained model learned, as figures: the ViT paper's Figure 7 (embedding filters, position
similarity, attention distance) and attention maps with rollout, at any patch size down to pixels.

    pixformer analyze --checkpoint runs/pit-n-digits          # -> runs/pit-n-digits/analysis/

Every run a ViT trained is analysed: a classifier's or a linear probe's ViT, an MAE run's encoder
(`model.encoder`), a native-resolution run's ViT at the square its position table is laid out for
(the images resized to it); a ConvMixer gets its filters. A DiT (diffusion) run is refused in one
line: its attention depends on the noise level and the class it is given, not on an image alone.

Each analysis writes a figure and the numbers behind it, NAME.png and NAME.json:
    attention_distance     mean attention distance in pixels, one dot per head and layer
    pos_embed_similarity   cosine similarity of each position's embedding to every other position
    patch_embed_pca        leading principal components of the patch-embedding filters
    attention_maps         chosen heads' attention on one image, and the attention rollout
and analysis.json says what was written and why any analysis does not apply to the model.

The analysis functions take tensors and return tensors; the plotting functions only draw.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..data.ablations import pixel_permutation
from ..data.augment import normalize, resize
from ..data.store import ImageSet, NativeSet
from ..data.splits import run_split
from ..engine.checkpoint import find_checkpoint, load_model
from ..engine.runtime import pick_device
from ..errors import PixformerError
from ..models.attention import record_attention
from ..layout import check_grid, grid_coords
from ..progress import Progress
from ..tasks import Classify, task_of
from ..files import output_folder, write_atomically
from ..tasks.figures import save_figure

CLS_NOTE = ("class token excluded as query and as key; each patch query's weights over the patch keys "
            "renormalised to sum to 1")
MEAN_NOTE = "no class token (mean pooling): all tokens are patch tokens"
ATTENTION_BUDGET = 256 * 2 ** 20   # bytes of attention probabilities held at once (all layers of a batch)


@dataclass
class AnalyzeConfig:
    checkpoint: str                     # run folder or its checkpoint/ folder
    data: str | None = None             # images to analyse (default: the data the run trained on)
    data_root: str | None = None        # where named datasets live (default: the run's)
    out: str | None = None              # output folder (default: <run folder>/analysis)
    num_images: int = 64                # images averaged over for the attention distance
    image_index: int = 0                # the image shown with its attention maps
    layer: int = -1                     # the layer whose attention maps are shown (0-based; -1 = last)
    heads: str = "all"                  # heads shown: 'all' or comma-separated indices, e.g. '0,2'
    weights: str = "auto"               # auto | model | ema
    device: str = "cpu"                 # cpu | cuda | cuda:N | auto


# ---- analysis: tensors in, tensors out -----------------------------------------------------
def token_centres(grid: tuple[int, int], patch: int) -> Tensor:
    """(N, 2) image position (row, col) in pixels of each token's centre, row-major: a token at grid
    cell (i, j) covers pixels i*p .. i*p+p-1, so its centre is (i*p + (p-1)/2, j*p + (p-1)/2)."""
    return grid_coords(*grid) * patch + (patch - 1) / 2


def mean_attention_distance(probs: Tensor, centres: Tensor, num_prefix: int = 0) -> Tensor:
    """One layer's attention (B, H, T, T), T = num_prefix + N, and the N token centres (N, 2) in pixels
    -> (B, H): per image and head, the attention-weighted mean query-key distance in pixels, averaged
    over the query tokens. Prefix (class) tokens are dropped as queries and keys, and each query's
    weights over the N patch keys renormalised to sum to 1."""
    w = probs[:, :, num_prefix:, num_prefix:].float()                    # (B, H, N, N)
    dist = torch.cdist(centres.float(), centres.float()).to(w.device)   # (N, N) pixels
    per_query = torch.einsum("bhqk,qk->bhq", w, dist) / w.sum(-1).clamp_min(1e-30)
    return per_query.mean(-1)                                            # (B, H)


def position_similarity(pe: Tensor) -> Tensor:
    """(N, D) position embeddings -> (N, N) cosine similarity of every position to every other."""
    pe = F.normalize(pe.detach().double(), dim=-1)
    return (pe @ pe.T).float()


def shown_positions(size: int, most: int = 8) -> list[int]:
    """At most `most` evenly spaced indices of 0..size-1, first and last included."""
    if size <= most:
        return list(range(size))
    return sorted({round(i * (size - 1) / (most - 1)) for i in range(most)})


def embedding_filters(model: nn.Module) -> Tensor:
    """The patch-embedding filters as images (D, C, p, p): ViT's nn.Linear over (p1 p2 c)-ordered patch
    vectors (p = 1: one C-vector per output) or a convolutional stem's nn.Conv2d(C, D, p, stride=p)."""
    stem = getattr(model, "patch_embed", None)
    if isinstance(stem, nn.Conv2d):
        return stem.weight.detach().float()
    if isinstance(stem, nn.Linear):
        p, c = model.cfg.patch_size, model.cfg.in_chans
        return rearrange(stem.weight.detach().float(), "d (p1 p2 c) -> d c p1 p2", p1=p, p2=p, c=c)
    raise PixformerError(f"{type(model).__name__} has no patch_embed Linear or Conv2d layer")


def principal_filters(filters: Tensor, k: int = 28) -> tuple[Tensor, Tensor]:
    """PCA of D filters (D, C, p, p), each a C*p*p vector, mean-centred -> the leading min(k, D, C*p*p)
    components (k, C, p, p), unit norm, signed so their largest entry is positive, and the fraction
    of the filters' variance each explains (k,)."""
    D, C, p, _ = filters.shape
    x = filters.reshape(D, -1).double()
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, len(s))
    comps = vh[:k]
    comps = comps * comps.gather(1, comps.abs().argmax(1, keepdim=True)).sign()
    explained = s[:k] ** 2 / (s ** 2).sum().clamp_min(1e-30)
    return comps.reshape(k, C, p, p).float(), explained.float()


def attention_rollout(maps: list[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of one image: per layer (H, T, T) maps in forward order
    -> (T, T) how much each output token draws on each input token: average the heads, add the
    identity (the residual), renormalise the rows, and multiply through the layers."""
    T = maps[0].shape[-1]
    eye = torch.eye(T, dtype=torch.float64, device=maps[0].device)
    rollout = eye
    for a in maps:
        a = a.double().mean(0) + eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout.float()


def pooled_attention(attn: Tensor, num_prefix: int, cls: bool = True) -> Tensor:
    """(..., T, T) attention or rollout -> (..., N) weight of each patch token in what the classifier
    reads: the class token's row over the patch keys, or, with mean pooling (no class token, or `cls`
    False: a probe of the mean patch token), the mean of the patch tokens' rows, since the pooled
    feature is their mean."""
    if num_prefix and cls:
        return attn[..., 0, num_prefix:]
    return attn[..., num_prefix:, num_prefix:].mean(-2)


# ---- the model and its data ----------------------------------------------------------------
def attention_layers(model: nn.Module) -> int:
    return len(record_attention(model).layers)


def num_prefix_tokens(model: nn.Module) -> int:
    return 0 if getattr(model, "cls_token", None) is None else 1


def analysis_split(state: dict[str, Any], source: str | None, root: str | None) -> tuple[ImageSet, str]:
    """The images to analyse: the test split of `source`, or for the run's own data without one the
    validation images held out at training time (data.splits.run_split), pixels permuted as trained."""
    return run_split(state, source, root, "test", or_val=True)


def attention_batch_size(model: nn.Module, tokens: int) -> int:
    """Images per forward so the recorded probabilities of all layers stay within ATTENTION_BUDGET."""
    heads = max(getattr(model.cfg, "heads", 1), 1)
    per_image = attention_layers(model) * heads * tokens * tokens * 4
    return max(1, ATTENTION_BUDGET // max(per_image, 1))


@torch.no_grad()
def attention_distances(model: nn.Module, x: Tensor, centres: list[Tensor], num_prefix: int) -> Tensor:
    """Normalised images (B, C, H, W) and K sets of token centres (N, 2) -> (K, L, H) mean attention
    distance in pixels per layer and head, averaged over the images, measured with each set."""
    total = 0.0
    bs = attention_batch_size(model, len(centres[0]) + num_prefix)
    centres = [c.to(x.device) for c in centres]
    with Progress(len(x), "attention distance") as progress:
        for chunk in x.split(bs):
            with record_attention(model) as maps:
                model(chunk)
            total = total + torch.stack([torch.stack([mean_attention_distance(m, c, num_prefix).sum(0) for m in maps])
                                         for c in centres])
            progress.update(len(chunk))
    return total / len(x)


def parse_heads(spec: str, num_heads: int) -> list[int]:
    if str(spec).strip().lower() == "all":
        return list(range(num_heads))
    try:
        heads = [int(h) for h in str(spec).split(",") if h.strip()]
    except ValueError:
        raise PixformerError(f"--heads must be 'all' or comma-separated head indices, got {spec!r}") from None
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad or not heads:
        raise PixformerError(f"head {bad[0] if bad else spec!r} does not exist: "
                             f"the model has {num_heads} heads per layer (0..{num_heads - 1})")
    return heads


def resolve_layer(layer: int, depth: int) -> int:
    if not -depth <= layer < depth:
        raise PixformerError(f"layer {layer} does not exist: the model has {depth} attention layers "
                             f"(0..{depth - 1}, or -1 for the last)")
    return layer % depth


# ---- plotting ------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _caption(fig, text: str):
    fig.text(0.01, 0.005, text, fontsize=7, color="0.3", ha="left", va="bottom", wrap=True)


def plot_attention_distance(dist: Tensor, uniform: float, path: Path, title: str, caption: str,
                            original: Tensor | None = None):
    """Mean attention distance (L, H): one dot per head, layer on x (the ViT paper's Figure 7 right).
    `original`: the same measured at the pixels' unpermuted positions (hollow dots)."""
    plt = _plt()
    L, H = dist.shape
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=130)
    colours = plt.cm.tab10.colors
    for h in range(H):
        ax.scatter(range(L), dist[:, h].tolist(), s=22, color=colours[h % 10], alpha=0.85,
                   label=f"head {h}" if H <= 10 else None)
        if original is not None:
            ax.scatter(range(L), original[:, h].tolist(), s=26, facecolors="none", edgecolors=colours[h % 10],
                       label="at unpermuted positions" if h == 0 else None)
    ax.axhline(uniform, color="0.4", ls="--", lw=1, label="uniform attention")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(range(L))
    top = max(uniform, float(dist.max()), float(original.max()) if original is not None else 0.0)
    ax.set_ylim(0, top * 1.1 + 1e-6)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _caption(fig, caption)
    save_figure(fig, path)


def plot_position_similarity(sim: Tensor, grid: tuple[int, int], rows: list[int], cols: list[int],
                             path: Path, title: str):
    """A grid of maps: for each shown position (row, col), its cosine similarity to every position,
    at full grid resolution (the ViT paper's Figure 7 centre); drawn as one mosaic image."""
    plt = _plt()
    gh, gw = grid
    zoom = max(1, 8 // min(gh, gw))                 # small grids drawn larger so the gaps stay thin
    gap = max(1, min(gh, gw) * zoom // 8)
    sh, sw = gh * zoom, gw * zoom                   # one map's size in the mosaic
    mosaic = torch.full((len(rows) * (sh + gap) - gap, len(cols) * (sw + gap) - gap), float("nan"))
    for a, r in enumerate(rows):
        for b, c in enumerate(cols):
            m = sim[r * gw + c].reshape(gh, gw).repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
            mosaic[a * (sh + gap): a * (sh + gap) + sh, b * (sw + gap): b * (sw + gap) + sw] = m
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    ratio = mosaic.shape[0] / mosaic.shape[1]
    w, h = (6.0, 6.0 * ratio) if ratio <= 1 else (6.0 / ratio, 6.0)     # the mosaic's size in inches
    fig, ax = plt.subplots(figsize=(max(w, 1.5) + 1.8, max(h, 1.5) + 1.3), dpi=130)
    im = ax.imshow(mosaic.numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([b * (sw + gap) + (sw - 1) / 2 for b in range(len(cols))], [str(c) for c in cols], fontsize=8)
    ax.set_yticks([a * (sh + gap) + (sh - 1) / 2 for a in range(len(rows))], [str(r) for r in rows], fontsize=8)
    ax.tick_params(length=0, labeltop=True, labelbottom=False)
    ax.set_xlabel("input token column")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("input token row")
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=9, pad=30)
    wide = ratio < 0.5                              # a flat mosaic gets its colour bar underneath
    bar = fig.colorbar(im, ax=ax, orientation="horizontal" if wide else "vertical",
                       fraction=0.05 if wide else 0.046 * min(ratio, 1), pad=0.08 if wide else 0.02)
    bar.set_label("cosine similarity", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _to_rgb(comp: Tensor) -> Tensor:
    """A signed (C, p, p) component -> displayable (p, p, 3) in [0, 1], zero at mid-grey."""
    img = 0.5 + 0.5 * comp / comp.abs().max().clamp_min(1e-12)
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    return img.permute(1, 2, 0).clamp(0, 1)


def plot_filters(comps: Tensor, explained: Tensor, path: Path, title: str):
    """Principal components of the embedding filters as small images, zero at mid-grey (p = 1: colour
    swatches with the component's channel weights written underneath)."""
    plt = _plt()
    k, C, p, _ = comps.shape
    ncol = min(k, 7)
    nrow = math.ceil(k / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(1.35 * ncol + 0.4, 4.5), 1.5 * nrow + 0.9), dpi=130,
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        ax.imshow(_to_rgb(comps[i]).numpy(), interpolation="nearest")
        ax.set_title(f"PC{i + 1}  {100 * explained[i]:.1f}%", fontsize=7)
        if p == 1:
            names = "RGB" if C == 3 else [f"c{j}" for j in range(C)]
            ax.text(0.5, -0.08, " ".join(f"{n}{v:+.2f}" for n, v in zip(names, comps[i, :, 0, 0].tolist())),
                    transform=ax.transAxes, ha="center", va="top", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_attention_maps(image: Tensor, maps: Tensor, labels: list[str], path: Path, title: str, caption: str):
    """The uint8 image (C, H, W), then each (gh, gw) map stretched over the image's pixels, each on its
    own colour scale, with the image's outline drawn on top."""
    plt = _plt()
    img = image.permute(1, 2, 0).float().numpy() / 255.0
    gray = img.shape[2] == 1
    H, W = img.shape[:2]
    lum = img.mean(2)
    panels = 1 + len(maps)
    ncol = min(panels, 6)
    nrow = math.ceil(panels / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.0 * ncol, 2.15 * nrow + 0.5), dpi=130, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1,
                      interpolation="nearest")
    axes[0][0].set_title("image", fontsize=8)
    for i, (m, label) in enumerate(zip(maps, labels), start=1):
        ax = axes[i // ncol][i % ncol]
        ax.imshow(m.numpy(), cmap="inferno", interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        if lum.max() > lum.min():
            ax.contour(lum, levels=[(lum.min() + lum.max()) / 2], colors="cyan", linewidths=0.8)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _caption(fig, caption)
    save_figure(fig, path)


# ---- the command ---------------------------------------------------------------------------
class NotApplicable(Exception):
    """An analysis that does not apply to this model; the message says why, in one line."""


@dataclass
class Subject:
    """A trained model and the facts about it that the analyses need."""
    model: nn.Module            # the network analysed: the run's ViT (an MAE or probe run's encoder) or ConvMixer
    state: dict[str, Any]
    kind: str                   # model class name (and whose encoder it is)
    patch: int
    grid: tuple[int, int]       # token grid at the trained image size (native resolution: the table's square)
    prefix: int                 # class tokens before the patch tokens (0 or 1)
    depth: int                  # attention layers (0: no attention, e.g. ConvMixer)
    device: torch.device
    classifier: nn.Module | None = None   # what predicts a class from an image (the probe around its encoder)
    reads_cls: bool = True      # whether the class the classifier predicts is read from the class token

    def require_attention(self):
        if self.depth == 0:
            raise NotApplicable(f"{self.kind} has no attention layers")


@dataclass
class Images:
    """The images the attention analyses look at, laid out as the model was trained on them."""
    data: ImageSet              # uint8, after the run's pixel permutation (if any)
    where: str                  # "source [split]", for titles
    perm: Tensor | None         # the run's pixel permutation (locality ablation), or None
    mean: list[float]
    std: list[float]

    def normalized(self, idx: slice, device) -> Tensor:
        return normalize(self.data.images[idx].to(device), self.mean, self.std)


def _rounded(x, digits: int = 5):
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


def figure_filters(s: Subject, out: Path) -> dict[str, Any]:
    filters = embedding_filters(s.model).cpu()                        # (D, C, p, p)
    comps, explained = principal_filters(filters)
    D, C, p, _ = filters.shape
    title = (f"{s.kind} patch embedding: {D} filters of {C}x{p}x{p}\n"
             f"principal components{' as colours' if p == 1 else ''}, % of variance explained")
    if C * p * p == 1:
        title += "\n(one input value per token: every filter is a multiple of one direction)"
    plot_filters(comps, explained, out / "patch_embed_pca.png", title)
    return {"filters_shape": list(filters.shape), "layout": "(D, C, p, p); a ViT's Linear input (p1 p2 c) reshaped",
            "pca": "filters as C*p*p vectors, mean-centred; components unit-norm, largest entry positive",
            "explained_variance": _rounded(explained), "components": _rounded(comps)}


def figure_position_similarity(s: Subject, out: Path) -> dict[str, Any]:
    embed = getattr(s.model, "position_embedding", None)
    pe = embed(s.grid) if callable(embed) else None                   # (N, D)
    if pe is None:
        kind = getattr(s.model.cfg, "pos_embed", None)
        raise NotApplicable(f"{s.kind} has no position embedding" + (f" (pos_embed={kind!r})" if kind else ""))
    sim = position_similarity(pe).cpu()                               # (N, N)
    (gh, gw), kind = s.grid, s.model.cfg.pos_embed
    rows, cols = shown_positions(gh), shown_positions(gw)
    shown = "" if (len(rows), len(cols)) == s.grid else f"; {len(rows)}x{len(cols)} evenly spaced positions shown"
    plot_position_similarity(sim, s.grid, rows, cols, out / "pos_embed_similarity.png",
                             f"{s.kind} position embedding ({kind}): cosine similarity, {gh}x{gw} grid{shown}")
    return {"pos_embed": kind, "grid": [gh, gw], "rows": rows, "cols": cols,
            "maps": {f"{r},{c}": _rounded(sim[r * gw + c].reshape(gh, gw), 4) for r in rows for c in cols}}


def figure_attention_distance(s: Subject, out: Path, images: Images | None, n: int) -> dict[str, Any]:
    s.require_attention()
    x = images.normalized(slice(0, n), s.device)                      # (n, C, H, W)
    centres = [token_centres(s.grid, s.patch)]
    if images.perm is not None and s.patch == 1:  # pixel tokens also have a position in the unpermuted image
        centres.append(grid_coords(*s.grid)[images.perm])
    dist = attention_distances(s.model, x, centres, s.prefix).cpu()    # (K, L, H)
    N = len(centres[0])
    uniform = mean_attention_distance(torch.full((1, 1, N, N), 1.0 / N), centres[0]).item()
    note = CLS_NOTE if s.prefix else MEAN_NOTE
    centre = f"grid index x {s.patch} + {(s.patch - 1) / 2:g}"
    plot_attention_distance(dist[0], uniform, out / "attention_distance.png",
                            f"{s.kind}, patch {s.patch} ({s.grid[0]}x{s.grid[1]} tokens): mean attention distance"
                            f"\nover {len(x)} images of {images.where}",
                            f"{note}. Token centre = {centre} px; dashed: uniform attention over all tokens.",
                            original=dist[1] if len(dist) > 1 else None)
    numbers = {"unit": "pixels", "per_layer_head": _rounded(dist[0]), "uniform_attention": round(uniform, 5),
               "num_images": len(x), "images": images.where, "cls_token": note, "token_centre": centre + " pixels"}
    if len(dist) > 1:
        numbers["per_layer_head_unpermuted"] = _rounded(dist[1])
    return numbers


def figure_attention_maps(s: Subject, out: Path, images: Images | None, i: int, layer: int,
                          heads: list[int]) -> dict[str, Any]:
    s.require_attention()
    with torch.no_grad(), record_attention(s.model) as maps:       # a probe runs its encoder's blocks
        logits = (s.model if s.classifier is None else s.classifier)(images.normalized(slice(i, i + 1), s.device))
    maps = [m[0].cpu() for m in maps]                                  # L x (H, T, T)
    head_maps = pooled_attention(maps[layer][heads], s.prefix, s.reads_cls).reshape(len(heads), *s.grid)
    rollout = pooled_attention(attention_rollout(maps), s.prefix, s.reads_cls).reshape(s.grid)
    how = ("the class token's attention to the patches" if s.prefix and s.reads_cls
           else "each patch's attention weight averaged over the patch tokens' queries (mean pooling)")
    rollout_how = (f"heads averaged, identity added, rows renormalised, multiplied through the {s.depth} "
                   f"layer{'s' if s.depth > 1 else ''}")
    pred = None if s.classifier is None else s.state["data"]["classes"][logits.argmax(1).item()]
    title = f"{images.where} image {i}: label {images.data.classes[images.data.labels[i].item()]}"
    plot_attention_maps(images.data.images[i], torch.cat([head_maps, rollout[None]]),
                        [f"layer {layer} head {h}" for h in heads] + ["rollout (all layers)"],
                        out / "attention_maps.png", title + ("" if pred is None else f", predicted {pred}"),
                        f"Maps: {how}, each on its own colour scale; cyan: the image's outline. "
                        f"Rollout (Abnar & Zuidema 2020): {rollout_how}.")
    return {"image": title, "predicted": pred, "layer": layer, "heads": heads, "maps": how,
            "head_maps": _rounded(head_maps), "rollout": _rounded(rollout), "rollout_method": rollout_how}


def load_subject(cfg: AnalyzeConfig) -> tuple[Subject, Path]:
    ckpt = find_checkpoint(cfg.checkpoint)
    if ckpt is None:
        raise PixformerError(f"no checkpoint in {cfg.checkpoint} (expected state.json and model.safetensors)")
    model, state = load_model(ckpt, cfg.weights)
    if state["model"]["arch"] == "dit":
        raise PixformerError(f"{cfg.checkpoint} is a diffusion run (DiT): analyze reads the attention a classifier "
                             "or an encoder pays to an image, and a DiT's depends on the noise level and the class "
                             "it is given; see its samples with pixformer sample")
    device = pick_device(cfg.device)
    model = model.float().to(device)
    task = task_of(state)
    vit = getattr(model, "encoder", model)          # an MAE or probe run: the ViT inside
    kind = type(vit).__name__ + ("" if vit is model else f" ({task.name} run's encoder)")
    patch = vit.cfg.patch_size
    grid = check_grid(tuple(state["data"]["img_size"]), patch)
    return Subject(vit, state, kind, patch, grid, num_prefix_tokens(vit), attention_layers(vit), device,
                   classifier=model if isinstance(task, Classify) else None,
                   reads_cls=getattr(model.cfg, "features", "auto") != "mean"), ckpt


def load_images(s: Subject, cfg: AnalyzeConfig) -> Images:
    """The images analysed: as the run trained on them, pixels permuted if it did; a native-resolution
    run's (each its own size) resized to the square its position table is laid out for (its grid)."""
    data, where = analysis_split(s.state, cfg.data, cfg.data_root)
    if not 0 <= cfg.image_index < len(data):
        raise PixformerError(f"--image-index {cfg.image_index} is out of range: {where} has {len(data)} images")
    if isinstance(data, NativeSet):
        n = min(len(data), max(cfg.num_images, cfg.image_index + 1))    # only those analysed are resized
        size = (s.grid[0] * s.patch, s.grid[1] * s.patch)
        data = ImageSet(torch.cat([resize(data.images[k][None], size) for k in range(n)]), data.labels[:n],
                        data.classes)
        return Images(data, f"{where} resized to {size[0]}x{size[1]}", None, s.state["data"]["mean"],
                      s.state["data"]["std"])
    perm = pixel_permutation(s.state["train_config"], *data.images.shape[-2:])   # None unless an ablation
    where += "" if perm is None else " (pixels permuted as in training)"
    return Images(data, where, perm, s.state["data"]["mean"], s.state["data"]["std"])


def analyze(cfg: AnalyzeConfig) -> dict[str, Any]:
    """Write the figures and their numbers for the checkpoint in `cfg.checkpoint`; returns the summary
    also written to analysis.json: per analysis, its files, or why it does not apply."""
    s, ckpt = load_subject(cfg)
    if cfg.num_images < 1:
        raise PixformerError(f"--num-images must be at least 1, got {cfg.num_images}")
    images = heads = layer = None
    if s.depth:  # check the choices and load the images before writing anything
        heads, layer = parse_heads(cfg.heads, s.model.cfg.heads), resolve_layer(cfg.layer, s.depth)
        images = load_images(s, cfg)
    out = output_folder(Path(cfg.out) if cfg.out else ckpt.parent / "analysis")
    analyses = {"patch_embed_pca": lambda: figure_filters(s, out),
                "pos_embed_similarity": lambda: figure_position_similarity(s, out),
                "attention_distance": lambda: figure_attention_distance(s, out, images, cfg.num_images),
                "attention_maps": lambda: figure_attention_maps(s, out, images, cfg.image_index, layer, heads)}
    results: dict[str, Any] = {}
    for name, run in analyses.items():
        try:
            numbers = run()
        except NotApplicable as e:
            results[name] = {"applies": False, "reason": str(e)}
            print(f"{name}: does not apply ({e})")
            continue
        write_atomically(out / f"{name}.json", json.dumps(numbers, indent=1))
        results[name] = {"applies": True, "png": f"{name}.png", "json": f"{name}.json"}
        print(f"{name}: wrote {out / name}.png and .json")
    summary = {"checkpoint": str(ckpt), "model": s.state["model"], "settings": asdict(cfg), **results}
    write_atomically(out / "analysis.json", json.dumps(summary, indent=1))
    print(f"analysis folder: {out}")
    return summary
