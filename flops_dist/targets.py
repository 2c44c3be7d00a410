"""Which parameters are perturbed, and forwards at θ + σu that never touch θ in place.

θ is one flat float32 vector (the master copy, also for half-precision models). Forwards go through
torch.func.functional_call, so the module's own parameters are never written: a perturbed forward
cannot drift θ, which is what keeps replicas bit-identical.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from .losses import losses_and_embeddings
from .noise import noise, noise_batch


@dataclass(frozen=True)
class Target:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)

    @classmethod
    def select(cls, model: nn.Module, include: str | list[str] = "all") -> "Target":
        """`all`, a list of regular expressions matched against parameter names, or a module's name
        (its parameters are those under `name.`)."""
        params = dict(model.named_parameters())
        patterns = [include] if isinstance(include, str) else list(include)
        if patterns == ["all"]:
            names = list(params)
        else:
            modules = dict(model.named_modules())
            names = [n for n in params
                     if any(re.fullmatch(p, n) or (p in modules and n.startswith(p + ".")) for p in patterns)]
        if not names:
            raise ValueError(f"target {include!r} selects no parameter; the model has: "
                             + ", ".join(list(params)[:20]))
        return cls(tuple(names), tuple(params[n].shape for n in names), tuple(params[n].dtype for n in names))

    def flatten(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1).to(torch.float32) for n in self.names]).clone()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of flat [..., d] become parameters [..., *shape], cast to the model's dtype."""
        lead = flat.shape[:-1]
        out, offset = {}, 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            n = shape.numel()
            value = flat[..., offset:offset + n].reshape(*lead, *shape)
            out[name] = value if dtype == value.dtype else value.to(dtype)
            offset += n
        return out


class PerturbedForward:
    """Losses of a model at θ, at one perturbation θ + σ·sign·u(seed) over a batch (shared noise),
    or at one perturbation per example (independent noise). `loss` follows the protocol of
    losses.py; under independent noise only the model runs under vmap, and the loss gets the chunk's
    outputs as one plain batch (a frozen model behind a black-box target is never vmapped)."""

    def __init__(self, model: nn.Module, target: Target, loss, sigma: float, noise_kind: str,
                 device: torch.device, embedding_module: str | None = None):
        self.model, self.target, self.loss = model, target, loss
        self.sigma, self.noise_kind, self.device = sigma, noise_kind, device
        # non-target parameters and buffers are passed as they are, never copied per query
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in target.names}
        self.frozen.update(dict(model.named_buffers()))
        self.embedding_module = embedding_module
        if embedding_module is not None and embedding_module not in dict(model.named_modules()):
            raise ValueError(f"embedding module {embedding_module!r} is not a submodule of the model")

    def call(self, flat_theta, inputs):
        return functional_call(self.model, {**self.frozen, **self.target.unflatten(flat_theta)}, (inputs,))

    def losses(self, outputs, inputs, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-example losses of model outputs, and the loss's own embeddings where it gives them."""
        return losses_and_embeddings(self.loss, outputs, inputs, labels)

    def scores(self, outputs, inputs) -> torch.Tensor:
        """Class scores for the accuracy metric."""
        return self.loss.scores(outputs, inputs)

    @torch.no_grad()
    def clean(self, theta, inputs, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses at θ and embeddings: the loss's own, else the embedding module's
        output, else the model's output; token-averaged where they have a token axis."""
        captured = []
        handle = None
        if self.embedding_module is not None:
            module = dict(self.model.named_modules())[self.embedding_module]
            handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            outputs = self.call(theta, inputs)
        finally:
            if handle is not None:
                handle.remove()
        losses, emb = self.losses(outputs, inputs, labels)
        if emb is None:
            emb = captured[0] if captured else outputs
            emb = emb.reshape(emb.shape[0], -1, emb.shape[-1]).mean(1) if emb.dim() > 2 else emb
        return losses.float(), emb.float()

    @torch.no_grad()
    def shared(self, theta, seed: int, sign: int, inputs, labels) -> torch.Tensor:
        u = noise(seed, self.target.numel, self.noise_kind, device=self.device)
        return self.losses(self.call(theta + (sign * self.sigma) * u, inputs), inputs, labels)[0].float()

    @torch.no_grad()
    def independent(self, theta, seeds, signs, inputs, labels) -> torch.Tensor:
        u = noise_batch(seeds, self.target.numel, self.noise_kind, device=self.device)
        signs = torch.tensor(signs, dtype=torch.float32, device=self.device).reshape(-1, 1)
        thetas = theta + (self.sigma * signs) * u
        outputs = vmap(lambda flat, x: self.call(flat, x.unsqueeze(0))[0])(thetas, inputs)
        return self.losses(outputs, inputs, labels)[0].float()
