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

from .blackbox import FrozenModelLoss
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
    or at one perturbation per example (independent noise, vmapped).

    With a `FrozenModelLoss` the model is a black-box target: only the target runs under vmap, and
    the frozen model gets the chunk's (example, target output) pairs as one plain batch."""

    def __init__(self, model: nn.Module, target: Target, loss_fn, sigma: float, noise_kind: str,
                 device: torch.device, embedding_module: str | None = None):
        self.model, self.target, self.loss_fn = model, target, loss_fn
        self.sigma, self.noise_kind, self.device = sigma, noise_kind, device
        # non-target parameters and buffers are passed as they are, never copied per query
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in target.names}
        self.frozen.update(dict(model.named_buffers()))
        self.black_box = isinstance(loss_fn, FrozenModelLoss)
        self.embedding_module = embedding_module
        if embedding_module is not None and embedding_module not in dict(model.named_modules()):
            raise ValueError(f"embedding module {embedding_module!r} is not a submodule of the model")

    def call(self, flat_theta, inputs):
        return functional_call(self.model, {**self.frozen, **self.target.unflatten(flat_theta)}, (inputs,))

    def losses(self, outputs, inputs, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-example losses of model outputs, and the black box's embeddings where it gives them."""
        if not self.black_box:
            return self.loss_fn(outputs, labels), None
        result = self.loss_fn(outputs, inputs, labels)
        return result if isinstance(result, tuple) else (result, None)

    def scores(self, outputs, inputs) -> torch.Tensor:
        """Class scores for the accuracy metric: the model's outputs, or the black box's scores."""
        return self.loss_fn.scores(outputs, inputs) if self.black_box else outputs

    @torch.no_grad()
    def clean(self, theta, inputs, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses at θ and embeddings (the black box's embeddings, the embedding
        module's output, token-averaged, or the model's output when none is named)."""
        if self.black_box:
            outputs = self.call(theta, inputs)
            losses, emb = self.losses(outputs, inputs, labels)
            emb = outputs.reshape(len(labels), -1) if emb is None else emb
            return losses.float(), emb.float()
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
        emb = captured[0] if captured else outputs
        emb = emb.float().reshape(emb.shape[0], -1, emb.shape[-1]).mean(1) if emb.dim() > 2 else emb.float()
        return self.loss_fn(outputs, labels).float(), emb

    @torch.no_grad()
    def shared(self, theta, seed: int, sign: int, inputs, labels) -> torch.Tensor:
        u = noise(seed, self.target.numel, self.noise_kind, device=self.device)
        return self.losses(self.call(theta + (sign * self.sigma) * u, inputs), inputs, labels)[0].float()

    @torch.no_grad()
    def independent(self, theta, seeds, signs, inputs, labels) -> torch.Tensor:
        u = noise_batch(seeds, self.target.numel, self.noise_kind, device=self.device)
        signs = torch.tensor(signs, dtype=torch.float32, device=self.device).reshape(-1, 1)
        thetas = theta + (self.sigma * signs) * u
        if self.black_box:
            outputs = vmap(lambda flat, x: self.call(flat, x.unsqueeze(0))[0])(thetas, inputs)
            return self.losses(outputs, inputs, labels)[0].float()

        def one(flat, x, y):
            return self.loss_fn(self.call(flat, x.unsqueeze(0)), y.unsqueeze(0))[0]

        return vmap(one)(thetas, inputs, labels).float()
