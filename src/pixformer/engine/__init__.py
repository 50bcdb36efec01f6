"""The engine: what every task shares. The loop (loop.train), its settings (config.TrainConfig), the
runtime (device, rank, collectives), checkpoints, the speed switches (perf) and the cost planner (plan)."""
from .checkpoint import load_model
from .config import TrainConfig
from .loop import evaluate, prepare_data, train
from .perf import Speed
from .runtime import Runtime

__all__ = ["TrainConfig", "train", "evaluate", "prepare_data", "load_model", "Speed", "Runtime"]
