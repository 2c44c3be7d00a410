"""Output-space noise, the FLOPS paper's estimator: noise on the outputs of nn.Linear layers, not on θ.

A query of example j adds σ·r_lj·sign·ε_l(seed) to the output y_l = W_l x_l + b_l of every target
layer l, at every position t (a token of a sequence model; one position for a plain batch). The noise
ε_l(seed)[t, o] is element t·out_l + o of noise(seed, offset = l·LAYER_STRIDE): a deterministic
function of (seed, layer, position), made by noise.py's counter hash, so any replica regenerates it.

With h_l = ∂ℓ/∂y_l and Δ the estimator's loss difference (lr: ℓ(y + σrε) − ℓ(y); antithetic: half the
± difference), Δ/σ ≈ Σ_l r_l h_lᵀε_l, so E[(Δ/σ) ε_l / r_l] = h_l and
    ĝ_{W_l} = (Δ / (σ r_l)) Σ_t ε_lt x_ltᵀ,    ĝ_{b_l} = (Δ / (σ r_l)) Σ_t ε_lt
is unbiased for ∂ℓ/∂W_l = Σ_t h_lt x_ltᵀ. The estimators' c_s (computed with the base σ) stay as they
are: ĝ = Σ_s c_s G(seed_s), and each replica rebuilds G from ε and the layer inputs x of the seed's
example, which its own clean forward recorded. Only seeds and coefficients travel.

Per-layer σ (`layer_sigma`): "rms" sets r_lj = max(RMS of y_lj at the clean forward, R_MIN), so the
noise is a fixed fraction σ of each layer's own activation scale; "one" sets r = 1.

ĉ_j: ‖ĝ_j‖² = (Δ/σ)² Σ_l ‖Σ_t ε_lt x̃_ltᵀ‖² / r_lj², and E‖Σ_t ε_lt x̃_ltᵀ‖² = out_l Σ_t ‖x̃_lt‖², so
    ĉ_j = κ_j · mean_k Δ_jk² / σ²,   κ_j = Σ_l (out_l / r_lj²) (Σ_t ‖x_ljt‖² [W_l in θ] + T [b_l in θ]).
Unlike weight space, κ depends on the example (through its inputs x). Dropped: Tr Cov's −‖g_j‖² and
the correlation of (Δ/σ)² with ε_l, terms of the order of ‖g_j‖² against κ_j E(Δ/σ)² (for one position
a relative change of at most 1/out_l); the tests find ĉ_j within a few % of the measured spread.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import LAYER_SIGMAS, ConfigError
from .noise import BLOCK, noise_batch
from .sharding import example_of_seed
from .targets import Target

LAYER_STRIDE = 1 << 40  # noise counters per layer: a layer's output may have 2**40 elements per example
R_MIN = 1e-3            # the least layer scale r, so a dead layer still gets noise and 1/r stays finite


@dataclass(frozen=True)
class OutputLayer:
    name: str                 # the nn.Linear module
    index: int                # its noise stream: counters from index·LAYER_STRIDE
    out: int                  # out_features
    weight: int | None        # the weight's offset in θ, None when it is not in the target
    bias: int | None          # likewise the bias


@dataclass
class LayerInputs:
    """A batch's clean-forward record of every target layer: inputs x [B, T, in] and scales r [B]."""
    x: dict[str, torch.Tensor]
    r: dict[str, torch.Tensor]


def output_layers(model: nn.Module, target: Target) -> tuple[OutputLayer, ...]:
    """The nn.Linear modules that own the target's parameters, in model order. Every target parameter
    must be a Linear's weight or bias: output noise has nowhere else to go."""
    offsets, at = {}, 0
    for name, shape in zip(target.names, target.shapes):
        offsets[name], at = at, at + shape.numel()
    owners = target.owners()
    layers = []
    for name, module in model.named_modules():
        if name not in owners:
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"target.include: train.noise_space = 'outputs' puts noise on the outputs of "
                              f"nn.Linear modules, and {name!r} is a {type(module).__name__}; select only Linear "
                              "weights and biases (e.g. a regex ending in \\.(weight|bias) on Linear names)")
        layers.append(OutputLayer(name, len(layers), module.out_features,
                                  offsets.get(f"{name}.weight"), offsets.get(f"{name}.bias")))
    return tuple(layers)


def layer_noise(seeds, layer: OutputLayer, positions: int, kind: str, device) -> torch.Tensor:
    """ε_l for each seed: [len(seeds), positions, out]."""
    eps = noise_batch(seeds, positions * layer.out, kind, layer.index * LAYER_STRIDE, device)
    return eps.reshape(-1, positions, layer.out)


def layer_scale(y: torch.Tensor, layer_sigma: str) -> torch.Tensor:
    """r per example [rows] from a layer's clean output [rows, ..., out]."""
    if layer_sigma == "one":
        return torch.ones(y.shape[0], device=y.device)
    rms = y.detach().float().reshape(y.shape[0], -1).pow(2).mean(1).sqrt()
    return rms.clamp_min(R_MIN)


def kappa(layers: tuple[OutputLayer, ...], inputs: LayerInputs) -> torch.Tensor:
    """κ_j [B] (module docstring), in float64."""
    total = 0.0
    for layer in layers:
        x = inputs.x[layer.name].double()
        per_position = (x.pow(2).sum((1, 2)) if layer.weight is not None else 0.0) \
            + (x.shape[1] if layer.bias is not None else 0.0)
        total = total + layer.out * per_position / inputs.r[layer.name].double() ** 2
    return total


class OutputSpace:
    """Hooks on a model's target layers: record the clean forward's inputs, add noise to queries'
    outputs, and rebuild ĝ from an update message. The model itself is never modified."""

    def __init__(self, model: nn.Module, target: Target, layer_sigma: str, noise_kind: str):
        if layer_sigma not in LAYER_SIGMAS:
            raise ConfigError(f"train.layer_sigma: unknown value {layer_sigma!r}; "
                              f"choose one of {', '.join(LAYER_SIGMAS)}")
        self.layers = output_layers(model, target)
        self.modules = [model.get_submodule(layer.name) for layer in self.layers]
        self.d, self.layer_sigma, self.noise_kind = target.numel, layer_sigma, noise_kind

    @contextlib.contextmanager
    def _hooked(self, hook):
        handles = [m.register_forward_hook(lambda mod, args, y, layer=layer: hook(layer, args[0], y))
                   for layer, m in zip(self.layers, self.modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def recording(self, store: list):
        """Append one LayerInputs per forward run inside (x as [rows, T, in], r [rows])."""
        x, r = {}, {}

        def record(layer, inputs, y):
            if layer.name in x:  # a second call would need noise and inputs per call
                raise ConfigError(f"target.include: {layer.name!r} runs more than once per forward; "
                                  "output-space noise needs each target Linear called once")
            x[layer.name] = inputs.detach().float().reshape(y.shape[0], -1, inputs.shape[-1])
            r[layer.name] = layer_scale(y, self.layer_sigma)

        with self._hooked(record):
            yield
        store.append(LayerInputs(x, r))

    @contextlib.contextmanager
    def noisy(self, seeds, signs: torch.Tensor, scale: dict[str, torch.Tensor]):
        """Forwards inside add σ·r·sign·ε(seed) to row q of each target layer's output; `scale`
        holds σ·r per layer for the rows [rows]."""
        seeds = np.asarray(seeds, np.int64)

        def add(layer, inputs, y):
            eps = layer_noise(seeds, layer, y[0].numel() // layer.out, self.noise_kind, y.device)
            s = (signs * scale[layer.name]).reshape(-1, *[1] * (y.dim() - 1))
            return y + (s * eps.reshape(y.shape)).to(y.dtype)

        with self._hooked(add):
            yield

    def gradient(self, seeds, coefficients, inputs: LayerInputs) -> torch.Tensor:
        """ĝ = Σ_s c_s G(seed_s), flat [d] in θ's order; the seed's example is example_of_seed(seed)."""
        seeds = np.asarray(seeds, np.int64)
        device = next(iter(inputs.x.values())).device
        c = torch.tensor(np.asarray(coefficients, np.float64), dtype=torch.float32, device=device)
        examples = torch.from_numpy(example_of_seed(seeds)).to(device)
        grad = torch.zeros(self.d, device=device)
        for layer in self.layers:
            self._add_layer(grad, layer, inputs.x[layer.name], c / inputs.r[layer.name][examples], seeds, examples)
        return grad

    def _add_layer(self, grad, layer, x, a, seeds, examples) -> None:
        """grad[W_l] += Σ_s a_s ε_sᵀ x_{j(s)}, grad[b_l] += Σ_s a_s Σ_t ε_st, a block of seeds at a
        time so no [seeds, T, width] tensor outgrows BLOCK."""
        positions, width = x.shape[1], x.shape[2]
        per = max(1, BLOCK // (positions * max(width, layer.out)))
        w = torch.zeros(layer.out, width, device=x.device)
        b = torch.zeros(layer.out, device=x.device)
        for s0 in range(0, len(seeds), per):
            weighted = layer_noise(seeds[s0:s0 + per], layer, positions, self.noise_kind, x.device) \
                * a[s0:s0 + per, None, None]
            rows = weighted.reshape(-1, layer.out)
            w += rows.T @ x[examples[s0:s0 + per]].reshape(-1, width)
            b += rows.sum(0)
        if layer.weight is not None:
            grad[layer.weight:layer.weight + w.numel()] = w.reshape(-1)
        if layer.bias is not None:
            grad[layer.bias:layer.bias + layer.out] = b
