"""flops_dist: forward-only training on Ray with the FLOPS query allocator."""
from .config import Config, ConfigError
from .data import ArrayDataset, DataError

__all__ = ["Config", "ConfigError", "ArrayDataset", "DataError", "train", "TrainResult", "TrainingError"]


def __getattr__(name):
    # the Ray runtime is imported on first use, so the math modules stay importable without it
    if name in ("train", "TrainResult", "TrainingError"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
