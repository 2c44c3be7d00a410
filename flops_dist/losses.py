"""One loss protocol for every model:

    loss(outputs, inputs, labels) -> (losses [n], embeddings [n, m] | None)

with `loss.scores(outputs, inputs)` for the accuracy metric and `loss.ensure_loaded(device)`, called
once per replica. A plain per-example loss `fn(outputs, labels)` is wrapped once, at the edge
(`as_loss`). A frozen model behind the target (a black box: an API, a subprocess, a network too large
to differentiate) subclasses `FrozenModelLoss`.

The perturbed forward treats every loss alike: the model (or black-box target) runs under vmap, one
θ per query, and the loss sees the chunk's outputs as one plain batch. So a frozen model is never
vmapped and never differentiated, and it can be anything callable.
"""
from __future__ import annotations

import abc

import torch


class FrozenModelLoss(abc.ABC):
    """Subclass: `load` builds the frozen model (called once per replica, where it runs) and returns
    it; `__call__` and `scores` receive it as `self.frozen`. The loaded model is never pickled, so a
    loss object ships to workers as its settings only."""

    frozen = None

    @abc.abstractmethod
    def load(self, device: torch.device):
        """Load the frozen model onto `device` and return it (kept as `self.frozen`)."""

    @abc.abstractmethod
    def __call__(self, outputs: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor):
        """Per-example losses [n] of target outputs [n, ...] for examples `inputs`, or a pair
        (losses [n], embeddings [n, m]): embeddings feed the FLOPS allocator's kernel."""

    def scores(self, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Class scores [n, classes] for the accuracy metric (argmax)."""
        raise TypeError(f"{type(self).__name__} defines no scores(), so data.metric must be 'loss'")

    def ensure_loaded(self, device: torch.device) -> None:
        if self.frozen is None:
            self.frozen = self.load(device)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("frozen", None)
        return state


class PerExampleLoss:
    """The protocol around a plain `fn(outputs, labels) -> losses [n]`: the model's outputs are its
    class scores, and the allocator's embeddings come from the model (PerturbedForward.clean)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, outputs, inputs, labels):
        return self.fn(outputs, labels), None

    def scores(self, outputs, inputs):
        return outputs

    def ensure_loaded(self, device) -> None:
        """Nothing to load."""


def as_loss(fn) -> FrozenModelLoss | PerExampleLoss:
    """A user's loss in the protocol: a FrozenModelLoss as it is, a plain function wrapped."""
    if isinstance(fn, (FrozenModelLoss, PerExampleLoss)):
        return fn
    if not callable(fn):
        raise TypeError(f"the loss must be callable, got {type(fn).__name__}")
    return PerExampleLoss(fn)


def losses_and_embeddings(loss, outputs, inputs, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call a protocol loss; a FrozenModelLoss may return its losses alone."""
    result = loss(outputs, inputs, labels)
    return result if isinstance(result, tuple) else (result, None)
