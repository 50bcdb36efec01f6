"""Tasks: what a run optimises and measures (see tasks/base.py for the interface the engine uses).

    classify   supervised classification (the default)
    mae        masked-autoencoder pretraining of a ViT at any patch size
    probe      a linear probe of a pretrained encoder (--init RUN)
    diffusion  DiT diffusion (class-conditional or not) at any patch size
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import PixformerError
from .base import DataFacts, Task
from .classify import Classify, ClassifyConfig
from .diffusion import Diffusion, DiffusionConfig
from .mae import MAE, MAETaskConfig
from .probe import Probe, ProbeConfig

TASKS: dict[str, type[Task]] = {t.name: t for t in (Classify, MAE, Probe, Diffusion)}


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise PixformerError(f"unknown task {name!r}; choose from {' | '.join(sorted(TASKS))}")
    return TASKS[name]


def task_config(name: str, task_args: dict[str, Any] | None = None) -> Any:
    """The settings dataclass of task `name` from `task_args`, or a clear error naming what it lacks."""
    cls = get_task(name).Config
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(task_args or {}) - known)
    if unknown:
        owners = {k: [t for t, c in TASKS.items() if k in {f.name for f in dataclasses.fields(c.Config)}] for k in unknown}
        where = "; ".join(f"{k} belongs to {' / '.join(v)}" for k, v in owners.items() if v)
        raise PixformerError(f"task {name!r} has no setting(s) {unknown}" + (f" ({where})" if where else "")
                             + f"; its settings are {sorted(known)}")
    return cls(**(task_args or {}))


def saved_task(state: dict[str, Any]) -> dict[str, Any]:
    """{"name", "config"} of the task a saved run (its state.json) trained."""
    return state.get("task", {"name": "classify", "config": {}})   # runs of 0.1 were all classify


def task_of(state: dict[str, Any]) -> Task:
    """The task of a saved run (its state.json), with its settings and data facts."""
    saved = saved_task(state)
    return get_task(saved["name"])(task_config(saved["name"], saved["config"]), DataFacts.from_dict(state["data"]))


__all__ = ["Task", "DataFacts", "TASKS", "get_task", "task_config", "task_of", "saved_task", "Classify",
           "ClassifyConfig", "MAE", "MAETaskConfig", "Probe", "ProbeConfig", "Diffusion", "DiffusionConfig"]
