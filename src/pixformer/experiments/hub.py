"""Trained models in the Hugging Face Hub's layout: a folder (or a Hub repository) holding

    config.json         the architecture and its settings, the task, the class names, the normalisation
                        and the image settings the run was trained with (everything `predict` needs)
    model.safetensors   the weights, under the same names as a run's checkpoint/model.safetensors
    README.md           a model card (an export into the folder again replaces it with the new model's)

Saving, loading and uploading are huggingface_hub's `PyTorchModelHubMixin`:

    hub = HubModel.from_run("runs/vit-n4")          # the run's EMA weights when it kept them
    hub.save_pretrained("vit-n4-digits")            # config.json + model.safetensors + README.md
    hub.push_to_hub("you/vit-n4-digits")            # needs `hf auth login`
    hub = load_hub("vit-n4-digits")                 # or a repository id: load_hub("you/vit-n4-digits")
    pixformer.predict(hub, ["photo.jpg"])           # or predict("vit-n4-digits", ...)

Nothing local travels in config.json: the run's data path, output folder and machine settings stay
behind; a named data set's name (digits, cifar10, ...) is kept.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PixformerError, install_hint
from ..files import as_created, json_object_or_empty, output_folder

try:
    from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError
except ImportError:                                             # pragma: no cover - the hub extra is missing
    raise PixformerError(f"the Hugging Face Hub layout needs huggingface_hub: {install_hint('hub')}") from None

FORMAT = 1              # config.json's layout (its "format")
# The run's settings that decide how an image becomes the model's input (size, budgets, packing, pixel
# permutation, precision): what `predict` reads from a run's train_config.
INPUT_SETTINGS = ("img_size", "max_side", "max_tokens", "pack_length", "max_per_pack", "resolution_range",
                  "token_drop", "token_drop_beta", "permute_pixels", "local_swaps", "swap_distance",
                  "permute_seed", "precision")

CARD = """---
{{ card_data }}
---

# {{ model_name }}

A [pixformer](https://pypi.org/project/pixformer/) {{ task }} model: `{{ model_name }}` ({{ arch }},
{{ params }} parameters), trained on {{ data }} at {{ size }} pixels, {{ n_classes }} classes
({{ weights }} weights). `config.json` holds the architecture, the class names, the normalisation and
the image settings; `model.safetensors` the weights.

```bash
pip install "pixformer[hub]"
pixformer predict --checkpoint {{ repo_id }} photo.jpg
```

```python
import pixformer
pixformer.predict("{{ repo_id }}", ["photo.jpg"])     # top-5 classes with probabilities
model = pixformer.load_hub("{{ repo_id }}")           # a torch module (model.module: the network)
```
"""


class HubModel(nn.Module, PyTorchModelHubMixin, library_name="pixformer", tags=["pixformer", "vision-transformer"],
               model_card_template=CARD):
    """A trained pixformer model as the Hub stores it: `config` (config.json) and `module`, the network
    itself (its state dict is model.safetensors). Calling it calls the network."""

    def __init__(self, config: dict):
        super().__init__()
        check_config(config)
        from ..models.registry import build
        self.config = config
        self.module = build(config["model"]["arch"], config["model"]["config"])

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def as_run(self) -> tuple[nn.Module, dict[str, Any]]:
        """(the network, a run's state as load_model returns it): what predict and export take."""
        c = self.config
        state = {"model": c["model"], "model_name": c["model_name"], "task": c["task"], "data": c["data"],
                 "train_config": c["settings"], "weights": c["weights"]}
        return self.module, state

    @classmethod
    def from_run(cls, run: str | Path, weights: str = "auto") -> "HubModel":
        """The run in `run` (a run folder or its checkpoint/) with its `weights` ('auto': EMA when kept)."""
        from ..engine.checkpoint import load_model, weights_used
        model, state = load_model(run, weights)
        hub = cls(config=hub_config(state, weights_used(state, weights)))
        hub.module.load_state_dict(model.state_dict())
        return hub.eval()

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, config: dict | None = None, **kwargs) -> "HubModel":
        """The mixin's loading step, with pixformer's checks: a folder without a pixformer config.json,
        or weights that do not fit the architecture, are one-line errors (never a half-loaded model)."""
        from ..engine.checkpoint import load_state, load_tensors
        if config is None:
            raise PixformerError(f"{model_id} has no config.json: not a pixformer model folder or repository")
        model = cls(config=config)
        if Path(model_id).is_dir():
            file = Path(model_id) / "model.safetensors"
        else:
            file = Path(hf_hub_download(repo_id=model_id, filename="model.safetensors", revision=revision,
                                        cache_dir=cache_dir, force_download=force_download, token=token,
                                        local_files_only=local_files_only))
        if not file.exists():
            raise PixformerError(f"{model_id} has no model.safetensors beside its config.json")
        load_state(model.module, load_tensors(file), file)
        return model.eval()

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict | None = None, **kwargs):
        """huggingface_hub's upload (needs `hf auth login`), the model card naming `repo_id`."""
        return super().push_to_hub(repo_id, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})},
                                   **kwargs)

    def generate_model_card(self, *args, **kwargs):
        from ..data.native import is_native
        c = self.config
        size = c["data"]["img_size"] if not is_native(c["settings"]) \
            else f"native resolution (longer side at most {c['settings'].get('max_side') or 'the token budget'})"
        facts = dict(model_name=c["model_name"], task=c["task"]["name"], arch=c["model"]["arch"],
                     params=f"{sum(p.numel() for p in self.module.parameters()):,}",
                     data=c["data"].get("source") or "its own images",
                     size="x".join(map(str, size)) if isinstance(size, list) else size,
                     n_classes=len(c["data"]["classes"]), weights=c["weights"], repo_id="USER/REPO")
        return super().generate_model_card(*args, **{**facts, **kwargs})


def hub_config(state: dict[str, Any], weights: str) -> dict[str, Any]:
    """config.json of a run (its state.json as `state`) whose `weights` ('model' or 'ema') are saved."""
    from .. import __version__
    from ..data.sources import NAMED_SOURCES
    from ..tasks import saved_task
    d, tc = state["data"], state.get("train_config", {})
    source = d.get("source") if d.get("source") in NAMED_SOURCES else None
    return {"format": FORMAT, "library": "pixformer", "pixformer_version": __version__,
            "model_name": state["model_name"], "model": state["model"],
            "task": saved_task(state),
            "data": {"classes": d["classes"], "in_chans": d["in_chans"], "img_size": list(d["img_size"]),
                     "mean": d["mean"], "std": d["std"], "source": source},
            "settings": {k: tc[k] for k in INPUT_SETTINGS if k in tc}, "weights": weights}


def check_config(config: Any) -> None:
    """A one-line error unless `config` is a pixformer config.json this version reads."""
    if not isinstance(config, dict) or config.get("library") != "pixformer":
        raise PixformerError("config.json is not a pixformer model's (no \"library\": \"pixformer\"); export one "
                             "with `pixformer export --format hf`")
    if config.get("format", 0) > FORMAT:
        raise PixformerError(f"config.json is of format {config['format']}, newer than this pixformer reads "
                             f"({FORMAT}, pixformer {config.get('pixformer_version')} wrote it): upgrade pixformer")
    from ..models.registry import ARCHITECTURES
    if config.get("model", {}).get("arch") not in ARCHITECTURES:
        raise PixformerError(f"config.json names an unknown architecture {config.get('model', {}).get('arch')!r}")


def is_hub_folder(path: str | Path) -> bool:
    """Whether `path` is a folder in the Hub layout (config.json and model.safetensors, no state.json)."""
    path = Path(path)
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() \
        and not (path / "state.json").exists()


def load_hub(source: str | Path, **kwargs) -> HubModel:
    """A model saved in the Hub layout: a local folder, or a Hub repository id ('you/vit-n4-digits';
    downloaded into huggingface_hub's cache). `kwargs` go to `from_pretrained` (revision, token, ...)."""
    what = f"{source} is not a model folder" if not Path(source).exists() else f"cannot load {source}"
    unreachable = None if Path(source).exists() or kwargs.get("local_files_only") else hub_unreachable()
    if unreachable:                     # huggingface_hub's cache alone, at once (it would retry for half a minute)
        kwargs = {**kwargs, "local_files_only": True}
    try:
        return HubModel.from_pretrained(source, **kwargs)
    except PixformerError:
        raise
    except (OSError, ValueError, HfHubHTTPError) as e:
        if unreachable:
            raise PixformerError(f"{what}, and the Hub ({unreachable}) cannot be reached to look for it, nor "
                                 "is it in huggingface_hub's cache; check the path, or the network") from None
        why = " ".join(str(e).split())
        why = why if len(why) <= 300 else why[:300].rsplit(" ", 1)[0] + " ..."
        raise PixformerError(f"{what}, and the Hub has no model {source} that can be had ({why})") from None


def hub_unreachable() -> str | None:
    """The Hub's host and why it cannot be reached, where its name has no address (offline, or a
    mistyped local path on a machine without internet); None where it may be reached (an address,
    a proxy that resolves it, or HF_HUB_OFFLINE, under which huggingface_hub asks nothing)."""
    import os
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub_constants
    if hub_constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                                                         "all_proxy")):
        return None
    host = urlparse(hub_constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host}: {e.strerror or e}"
    return None


def save_hub(run: str | Path, out: str | Path, weights: str = "auto") -> Path:
    """Write the run in `run` to the folder `out` in the Hub layout (config.json, model.safetensors,
    README.md). `out` must be empty, new, or a folder this wrote before (then replaced)."""
    return write_hub(HubModel.from_run(run, weights), hub_out(out))


def write_hub(hub: "HubModel", out: Path) -> Path:
    """`hub` saved into the checked folder `out` (hub_out), its files as readable as the umask makes a
    file (safetensors writes the weights owner-only); the folder stays as the user made it. The files are
    written into a hidden folder inside it, then moved in one by one (each replaced whole): an earlier
    export's config first removed, the new one moved in last, so a killed export leaves a folder without a
    config (which no load takes for a model, and an export replaces), never new weights under an old config."""
    import shutil
    import tempfile
    for stale in out.glob(f"{EXPORT_TMP}*"):                          # a killed export's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=EXPORT_TMP, dir=out))
        hub.save_pretrained(tmp)
        (out / "config.json").unlink(missing_ok=True)
        for name in ("model.safetensors", "README.md", "config.json"):
            as_created(tmp / name)
            os.replace(tmp / name, out / name)
    except OSError as e:
        raise PixformerError(f"cannot write the Hub layout into {out} ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


HUB_FILES = {"config.json", "model.safetensors", "README.md"}
EXPORT_TMP = ".export.tmp-"             # the folder an export writes in before moving its files into place


def hub_out(out: str | Path) -> Path:
    """The folder a Hub layout is written to, checked (and made) first: empty, new, or a folder an export
    of pixformer's wrote before, holding nothing else (then replaced); a file, a folder holding other
    files (another library's model among them) or one that cannot be written is one line."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PixformerError(f"--out {out} is a file; the Hub layout is a folder")
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(EXPORT_TMP)) and not _earlier_export(out):
        raise PixformerError(f"--out {out} is a folder holding files other than an earlier pixformer export's; "
                             "choose a new or empty folder")
    return output_folder(out)


def _earlier_export(out: Path) -> bool:
    """Whether the folder `out` holds an earlier export of pixformer's and nothing else: its config (of the
    pixformer library), or, where a kill stopped one before its config went in, its weights (and card)."""
    names = {p.name for p in out.iterdir() if not p.name.startswith(EXPORT_TMP)}
    if names - HUB_FILES:
        return False
    if "config.json" in names:
        return json_object_or_empty(out / "config.json").get("library") == "pixformer"
    card = (out / "README.md").read_text(errors="replace") if "README.md" in names else "pixformer"
    return "model.safetensors" in names and "pixformer" in card
