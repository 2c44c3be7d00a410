"""Which parameters are perturbed, and forwards at θ + σu that never touch θ in place.

θ is one flat float32 vector (the master copy, also for half-precision models). Forwards go through
torch.func.functional_call, so the module's own parameters are never written: a perturbed forward
cannot drift θ, which is what keeps replicas bit-identical.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from .losses import losses_and_embeddings
from .noise import BLOCK, blocks, noise_batch
from .prefix import FrozenPrefix


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
        return torch.cat([params[n].detach().reshape(-1).to(torch.float32) for n in self.names])  # a new tensor: cat copies

    def owners(self) -> set[str]:
        """The modules that hold a target parameter directly."""
        return {n.rpartition(".")[0] for n in self.names}

    def perturbed(self, theta: torch.Tensor, seeds, scale, kind: str) -> dict[str, torch.Tensor]:
        """Parameters at θ + scale·u(seed) for each seed: [rows, *shape] in the model's dtype. `scale`
        is a float or a [rows, 1] tensor. A small target makes its noise at once; a large one a
        block of one parameter tensor at a time, so no [rows, d] noise is made (the bits agree)."""
        seeds = np.asarray(seeds, np.int64).reshape(-1)
        if len(seeds) * self.numel <= BLOCK:
            return self.unflatten(_shifted(theta, scale, noise_batch(seeds, self.numel, kind, device=theta.device), kind))
        flat, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            value = torch.empty(len(seeds), n, device=theta.device)
            ranges, per = blocks(n, len(seeds))
            for a, b in ranges:
                for r in range(0, len(seeds), per):
                    s = scale[r:r + per] if torch.is_tensor(scale) else scale
                    u = noise_batch(seeds[r:r + per], b - a, kind, offset + a, theta.device)
                    value[r:r + per, a:b] = _shifted(theta[offset + a:offset + b], s, u, kind)
            flat[name], offset = value, offset + n
        return self._shaped(flat)

    def _shaped(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            value = flat[name].reshape(*flat[name].shape[:-1], *shape)
            out[name] = value if dtype == value.dtype else value.to(dtype)
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of flat [..., d] become parameters [..., *shape], cast to the model's dtype."""
        parts, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            parts[name], offset = flat[..., offset:offset + shape.numel()], offset + shape.numel()
        return self._shaped(parts)


def _shifted(theta: torch.Tensor, scale, u: torch.Tensor, kind: str) -> torch.Tensor:
    """θ + scale·u. For ±1 noise scale·u is exact, so one fused op (no [rows, n] temporary) gives the
    same bits; a Gaussian product is rounded first, as it always was."""
    if kind != "rademacher":
        return theta + scale * u
    if torch.is_tensor(scale):
        return torch.addcmul(theta, scale, u)
    return torch.add(theta, u, alpha=scale)


class PerturbedForward:
    """Losses of a model at θ, at one perturbation θ + σ·sign·u(seed) over a batch (shared noise),
    or at one perturbation per example (independent noise). `loss` follows the protocol of
    losses.py; under independent noise only the model runs under vmap, and the loss gets the chunk's
    outputs as one plain batch (a frozen model behind a black-box target is never vmapped).

    With a frozen prefix (`find_prefix`), `clean` records the prefix modules' outputs, `hold` keeps
    them for the step's batch, and a query given its examples' positions runs only the rest."""

    VMAP_ELEMENTS = 1 << 22  # independent queries share one vmapped forward while rows·d stays below this

    def __init__(self, model: nn.Module, target: Target, loss, sigma: float, noise_kind: str,
                 device: torch.device, embedding_module: str | None = None):
        self.model, self.target, self.loss = model, target, loss
        self.sigma, self.noise_kind, self.device = sigma, noise_kind, device
        for p in model.parameters():  # forwards only: no autograd bookkeeping on the frozen part either
            p.requires_grad_(False)
        # functional_call looks for tied weights on every call, a walk over all modules: only where there are any
        self.tied = len(list(model.named_parameters(remove_duplicate=False))) > len(list(model.parameters()))
        modules = dict(model.named_modules())
        if embedding_module is not None and embedding_module not in modules:
            raise ValueError(f"embedding module {embedding_module!r} is not a submodule of the model")
        self.embedding = None if embedding_module is None else modules[embedding_module]  # found once, not per forward
        self.prefix: FrozenPrefix | None = None
        self.prefix_values = None  # the held batch's prefix outputs, [batch, ...] per prefix module

    @torch.no_grad()
    def find_prefix(self, theta, inputs, boundary: str = "auto") -> None:
        """Turn on frozen-prefix reuse. `boundary`: "auto" (the first module that holds a target
        parameter), the name of the first module of the tail, or "off"."""
        if boundary == "off":
            return
        if boundary != "auto" and boundary not in dict(self.model.named_modules()):
            raise ValueError(f"target.frozen_prefix {boundary!r} is not a submodule of the model")
        owners = self.target.owners() if boundary == "auto" else {boundary}
        far = lambda: {k: v[0] for k, v in self.target.perturbed(theta, [0x5EED], 0.5, self.noise_kind).items()}
        self.prefix = FrozenPrefix.find(self.model, owners, lambda x: self._call(self.target.unflatten(theta), x),
                                        lambda: self._call(far(), inputs), inputs)

    def _call(self, params: dict[str, torch.Tensor], inputs):
        # only the target is swapped in: the rest of the module is its own, frozen parameters
        return functional_call(self.model, params, (inputs,), tie_weights=self.tied)

    def call(self, flat_theta, inputs):
        return self._call(self.target.unflatten(flat_theta), inputs)

    def losses(self, outputs, inputs, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-example losses of model outputs, and the loss's own embeddings where it gives them."""
        return losses_and_embeddings(self.loss, outputs, inputs, labels)

    def scores(self, outputs, inputs) -> torch.Tensor:
        """Class scores for the accuracy metric."""
        return self.loss.scores(outputs, inputs)

    @torch.no_grad()
    def clean(self, theta, inputs, labels, captured: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses at θ and embeddings: the loss's own, else the embedding module's
        output, else the model's output; token-averaged where they have a token axis. With
        `captured`, the prefix modules' outputs are appended to it."""
        embedded, handle = [], None
        if self.embedding is not None:
            handle = self.embedding.register_forward_hook(lambda m, i, o: embedded.append(o))
        recording = self.prefix.capture(captured) if captured is not None and self.prefix else contextlib.nullcontext()
        try:
            with recording:
                outputs = self.call(theta, inputs)
        finally:
            if handle is not None:
                handle.remove()
        losses, emb = self.losses(outputs, inputs, labels)
        if emb is None:
            emb = embedded[0] if embedded else outputs
            emb = emb.reshape(emb.shape[0], -1, emb.shape[-1]).mean(1) if emb.dim() > 2 else emb
        return losses.float(), emb.float()

    def hold(self, captured: list[dict]) -> None:
        """Keep the prefix outputs of the clean forwards in `captured`, in the batch's order."""
        self.prefix_values = self.prefix.cache(captured) if self.prefix and captured else None

    def _run(self, params, inputs, examples):
        if self.prefix_values is None or examples is None:
            return self._call(params, inputs)
        with self.prefix.replay(self.prefix.take(self.prefix_values, examples)):
            return self._call(params, inputs)

    @torch.no_grad()
    def at_theta(self, theta, inputs, labels, examples=None) -> torch.Tensor:
        """Losses at θ itself, under whatever output hooks are active (output-space queries)."""
        return self.losses(self._run(self.target.unflatten(theta), inputs, examples), inputs, labels)[0].float()

    @torch.no_grad()
    def shared(self, theta, seed: int, sign: int, inputs, labels, examples=None) -> torch.Tensor:
        """`examples`: the rows' positions in the held batch, for the prefix outputs."""
        params = self.target.perturbed(theta, [seed], sign * self.sigma, self.noise_kind)
        outputs = self._run({k: v[0] for k, v in params.items()}, inputs, examples)
        return self.losses(outputs, inputs, labels)[0].float()

    @torch.no_grad()
    def independent(self, theta, seeds, signs, inputs, labels, examples=None) -> torch.Tensor:
        if len(seeds) * self.target.numel > self.VMAP_ELEMENTS:  # a large target: one copy at a time
            return torch.cat([self.shared(theta, int(s), int(g), inputs[q:q + 1], labels[q:q + 1],
                                          None if examples is None else examples[q:q + 1])
                              for q, (s, g) in enumerate(zip(seeds, signs))])
        signs = torch.tensor(signs, dtype=torch.float32, device=self.device).reshape(-1, 1)
        params = self.target.perturbed(theta, seeds, self.sigma * signs, self.noise_kind)
        if self.prefix_values is None or examples is None:
            outputs = vmap(lambda p, x: self._call(p, x.unsqueeze(0))[0])(params, inputs)
        else:
            live, dead = self.prefix.take_live(self.prefix_values, examples)
            x, x_dim = (inputs[0], None) if self.prefix.input_dead else (inputs, 0)  # a dead input: one, unbatched
            outputs = vmap(lambda p, x, v: self._one_tail(p, x, v, dead), in_dims=(0, x_dim, 0))(params, x, live)
        return self.losses(outputs, inputs, labels)[0].float()

    def _one_tail(self, params, x, live, dead):
        """One query under vmap: the tail of the network on one example's prefix outputs (the dead
        ones, unbatched, are the same for every query)."""
        with self.prefix.replay({**pytree.tree_map(lambda v: v.unsqueeze(0), live), **dead}):
            return self._call(params, x.unsqueeze(0))[0]
