"""Shared setup for the benchmarks: the digits example's data, model and config, and the
measurement of gradient-estimate error against backprop."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from flops_dist.allocators import optimal_integer_allocation, variance_objective
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.update import reconstruct_gradient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits"
OUT = ROOT / "bench" / "out"


def digits_data() -> Path:
    """The prepared digits splits and pretrained ViT (made once, under bench/out/digits)."""
    data = OUT / "digits"
    if not (data / "digits_vit_pretrained.safetensors").exists():
        subprocess.run([sys.executable, str(EXAMPLE / "prepare.py"), str(data)], check=True)
    return data


def digits_config(**overrides):
    """The main job's config with its data under bench/out, plus `section.field` overrides."""
    from flops_dist.config import Config
    import tomllib
    raw = tomllib.loads((EXAMPLE / "digits.toml").read_text())
    data = digits_data()
    raw["model"]["weights"] = str(data / "digits_vit_pretrained.safetensors")
    raw["data"]["train"] = str(data / "digits_train.parquet")
    raw["data"]["test"] = str(data / "digits_test.parquet")
    for key, value in overrides.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return Config.from_dict(raw, EXAMPLE)


# --- gradient-estimate error against backprop, shared by the allocator benchmarks

class Capture(LocalExecutor):
    """Evaluates like LocalExecutor but keeps the update instead of applying it: θ stays put."""

    def apply(self, msg):
        self.message = msg


def example_gradients(replica, batch) -> torch.Tensor:
    """Backprop gradients of each example's loss w.r.t. θ, [B, d] in Target order (benchmarks only:
    the losses here are plain torch, so autograd can see through them)."""
    theta = replica.theta.clone().requires_grad_(True)
    x, y = replica.inputs[batch], replica.labels[batch]
    losses = replica.forward.losses(replica.forward.call(theta, x), x, y)[0]
    return torch.stack([torch.autograd.grad(l, theta, retain_graph=True)[0] for l in losses]).double()


def gradient_errors(train_cfg, replica, n_examples, batches, reps, raw=None) -> np.ndarray:
    """Per batch: MSE, variance and bias² of the estimate ĝ against the backprop gradient g, ‖g‖²
    and gᵀĝ̄. Each batch is pinned and the step index varied (new query seeds and allocator draws,
    the same for every allocator). `raw` loads a learned λ into the flops allocator."""
    executor = Capture([replica])
    engine = Engine(train_cfg, executor, n_examples, replica.d)
    if raw is not None:
        engine.allocator.raw.data.copy_(raw)
    out = []
    for b, batch in enumerate(batches):
        g = example_gradients(replica, batch).mean(0)
        engine.batch = lambda t, batch=batch: batch  # pin the batch; t now only moves the noise
        est = []
        for r in range(reps):
            engine.step(b * reps + r)
            est.append(reconstruct_gradient(executor.message, replica.d, train_cfg.noise).double())
        est = torch.stack(est)
        mse = ((est - g) ** 2).sum(1).mean().item()
        var = ((est - est.mean(0)) ** 2).sum().item() / (reps - 1)
        out.append((mse, var, mse - var, (g ** 2).sum().item(), (g @ est.mean(0)).item()))
    return np.array(out)  # [batches, (MSE, variance, bias², ‖g‖², gᵀĝ̄)]


def oracle_ratio(replica, batches, budget, a_min):
    """V(A*)/V(uniform) for the exact integer optimum A* on the true c_j = (d − 1)‖g_j‖² (lr estimator,
    Rademacher noise): the most any allocator could gain. Also the uniform MSE the theory predicts."""
    v_opt = v_unif = 0.0
    for batch in batches:
        c = (replica.d - 1) * (example_gradients(replica, batch) ** 2).sum(1).numpy()
        v_opt += variance_objective(c, optimal_integer_allocation(c, budget, a_min))
        v_unif += variance_objective(c, np.full(len(c), budget // len(c)))
    return v_opt / v_unif, v_unif / len(batches) / len(batches[0]) ** 2


def jackknife_ratio(num, den):
    """Σ num / Σ den and its leave-one-batch-out standard error."""
    n = len(num)
    loo = (num.sum() - num) / (den.sum() - den)
    return num.sum() / den.sum(), float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
