"""Black-box targets: small trainable modules whose output goes through a frozen model that
flops_dist never differentiates (a `flops_dist.losses.FrozenModelLoss`). Their parameters are θ.

- SoftPrompt: the prompt itself;
- PromptCode: a code z behind a fixed, seeded random projection;
- Projection: a linear map from frozen features into another model's embedding space.
"""
from __future__ import annotations

import math

import torch
from torch import nn


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
