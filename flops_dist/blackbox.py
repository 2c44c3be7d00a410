"""Black-box targets: a small trainable module whose output goes through a frozen model that
flops_dist never differentiates.

The user gives two things:

- the target, an nn.Module mapping a batch of inputs to target outputs (a soft prompt, a prompt code
  behind a fixed random projection, a projection head; see below). Its parameters are θ;
- a `FrozenModelLoss`: per-example losses of (target output, example) through the frozen model. The
  frozen model may be anything callable (a module, a subprocess, an HTTP service): it is loaded once
  per replica by `load`, on the worker, and only ever called forward.

A query perturbs θ, runs the target (cheap, vmapped over one θ per query) and sends the whole chunk
of (example, perturbed target output) pairs through the frozen model as one batch.
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn


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


class SoftPrompt(nn.Module):
    """A prompt of p embedding vectors, trained directly: θ = the prompt (p·dim values)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(init.detach().clone().float())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.prompt.expand(inputs.shape[0], *self.prompt.shape)


class PromptCode(nn.Module):
    """A prompt P = P₀ + reshape(z R): θ = a low-dimensional code z, R a fixed random projection
    (seeded, a buffer, never trained). Random subspaces keep forward-only estimates in few
    dimensions while still moving every prompt value."""

    def __init__(self, init: torch.Tensor, code_dim: int, scale: float | None = None, seed: int = 0):
        super().__init__()
        p, dim = init.shape
        gen = torch.Generator().manual_seed(seed)
        # each prompt value moves by about `scale` per unit of ‖z‖: by default the spread of P₀
        scale = float(init.std()) if scale is None else scale
        projection = torch.randn(code_dim, p * dim, generator=gen) * (scale / math.sqrt(code_dim))
        self.register_buffer("base", init.detach().clone().float())
        self.register_buffer("projection", projection)
        self.code = nn.Parameter(torch.zeros(code_dim))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        prompt = self.base + (self.code @ self.projection).reshape(self.base.shape)
        return prompt.expand(inputs.shape[0], *prompt.shape)


class Projection(nn.Module):
    """A linear map from frozen features to another model's embedding space (no bias)."""

    def __init__(self, in_features: int, out_features: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.float() @ self.weight.T
