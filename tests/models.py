"""Small real models and losses shared by the tests."""
import numpy as np
import torch
from torch import nn

from flops_dist.data import ArrayDataset


def build_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


def cross_entropy(outputs, labels):
    return nn.functional.cross_entropy(outputs, labels, reduction="none")


def nan_for_class_two(outputs, labels):
    """A loss that is NaN for every example of class 2, like a numerically broken pipeline."""
    loss = nn.functional.cross_entropy(outputs, labels, reduction="none")
    return torch.where(labels == 2, torch.full_like(loss, float("nan")), loss)


def blobs(n=240, seed=0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    centres = rng.normal(size=(3, 10)) * 2
    inputs = centres[labels] + rng.normal(size=(n, 10))
    return ArrayDataset(inputs.astype(np.float32), labels.astype(np.int64))
