"""Shared setup for the benchmarks: a fresh output directory per run, the examples' prepared data,
the digits config, the black-box applications, and the measurement of gradient-estimate error
against backprop."""
import copy
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import ray
import torch

from flops_dist.allocators import optimal_integer_allocation, variance_objective
from flops_dist.loading import build_model, load_callable
from flops_dist.config import Config
from flops_dist.data import ArrayDataset, load_dataset
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.replica import Replica, ReplicaSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
OUT = ROOT / "bench" / "out"


def fresh_dir(script: str) -> Path:
    """A new directory under bench/out for this run alone, so no earlier run (a bench's or the
    README's main job) can make it fail or be overwritten by it."""
    OUT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{script}-", dir=OUT))


def prepared_data(example: str, *prepare_args: str) -> Path:
    """examples/<example>'s data, made once by its prepare.py under bench/out (never in the user's
    examples/*/data). It is written to a temporary name and renamed, so an interrupted prepare
    leaves nothing that looks ready. prepare.py's output goes to stderr, so the bench's stdout holds
    only its results."""
    data = OUT / example
    if not data.is_dir():
        OUT.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{example}.partial-", dir=OUT))
        subprocess.run([sys.executable, str(EXAMPLES / example / "prepare.py"), str(partial), *prepare_args],
                       check=True, stdout=sys.stderr)
        try:
            partial.rename(data)
        except OSError:  # a bench running beside this one got there first: its data is the same
            if not data.is_dir():
                raise
            shutil.rmtree(partial)
    return data


class Report:
    """A bench's results, printed as they come and kept for its text file, and its progress on stderr
    with the seconds since it began."""

    def __init__(self):
        self.lines, self.began = [], time.perf_counter()

    def emit(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def progress(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.began:6.0f}s] {msg}", file=sys.stderr, flush=True)

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")


def example_job(example: str, toml: str) -> dict:
    """An example's job file as a dict, its data and weights paths pointing under bench/out."""
    raw = tomllib.loads((EXAMPLES / example / toml).read_text())
    data = prepared_data(example)
    for section, key in (("data", "train"), ("data", "test"), ("model", "weights")):
        if raw[section].get(key):
            raw[section][key] = str(data / raw[section][key].split("/")[-1])
    return raw


def wait_for_idle_cluster(cpus: int, timeout: float = 60.0) -> None:
    """Block until `cpus` CPUs are free again: the previous run's actors are gone, so they neither
    hold the CPUs the next run asks for nor compete with it."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < cpus:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray still has actors holding CPUs after {timeout:.0f} s: "
                               f"{ray.available_resources()}")
        time.sleep(0.2)


def digits_config(**overrides) -> Config:
    """The main job's config with its data under bench/out, plus `section__field` overrides."""
    raw = tomllib.loads((EXAMPLES / "digits" / "digits.toml").read_text())
    data = prepared_data("digits")
    raw["model"]["weights"] = str(data / "digits_vit_pretrained.safetensors")
    raw["data"]["train"] = str(data / "digits_train.parquet")
    raw["data"]["test"] = str(data / "digits_test.parquet")
    for key, value in overrides.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return Config.from_dict(raw, EXAMPLES / "digits")


# --- the black-box applications, shared by blackbox_apps and alignment_gradient_error

APPS = {
    "alignment": dict(example="digits_alignment", toml="alignment.toml", prepare=("--no-reference",),
                      train=dict(batch_size=32, queries_per_example=4, min_queries=2, chunk_size=64),
                      steps=300, eval_every=2, test_size=600),
    "prompt": dict(example="sentiment_prompt", toml="prompt_code.toml", prepare=(),
                   train=dict(batch_size=8, queries_per_example=4, min_queries=2, chunk_size=16),
                   steps=80, eval_every=10, test_size=200),
}


def app_config(app: dict) -> Config:
    """The example's config with its data under bench/out and the bench's budget."""
    example = EXAMPLES / app["example"]
    data = prepared_data(app["example"], *app["prepare"])
    raw = tomllib.loads((example / app["toml"]).read_text())
    for split in ("train", "test"):
        raw["data"][split] = str(data / (raw["data"][split].split("/")[-1]))
    raw["train"].update(app["train"], hash_every=0)
    return Config.from_dict(raw, example)


class Application:
    """One black-box application on the in-process reference engine, with one frozen model shared by
    every run. `test_size` caps the held-out examples (smoke runs use few)."""

    def __init__(self, name: str, test_size: int | None = None):
        self.name, self.app = name, APPS[name]
        self.cfg = app_config(self.app)
        d = self.cfg.data
        self.loss_fn = load_callable(self.cfg.model.loss, "model.loss")
        self.loss_fn.ensure_loaded(torch.device("cpu"))
        self.train = load_dataset(d.train, d.input_column, d.label_column)
        test = load_dataset(d.test, d.input_column, d.label_column)
        n = test_size or self.app["test_size"]
        self.test = ArrayDataset(test.inputs[:n], test.labels[:n])

    def config(self, allocator: str, **train) -> Config:
        """The application's config with another allocator and `train` fields."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.allocator = allocator
        for name, value in train.items():
            setattr(cfg.train, name, value)
        return cfg.validate()

    def replica(self, cfg: Config) -> Replica:
        t = cfg.train
        spec = ReplicaSpec(include=cfg.target.include, sigma=t.sigma, noise=t.noise,
                           optimizer=t.optimizer_config(), threads=1, device="cpu")
        return Replica(build_model(cfg), self.loss_fn, self.train, spec)


# --- gradient-estimate error against backprop, shared by the allocator benchmarks

class Capture(LocalExecutor):
    """Evaluates like LocalExecutor but keeps the update instead of applying it: θ stays put."""

    def queue_update(self, msg):
        self.message = msg


def example_gradients(replica, data, batch) -> torch.Tensor:
    """Backprop gradients of each example's loss w.r.t. θ, [B, d] in Target order (benchmarks only:
    the losses here are plain torch, so autograd can see through them)."""
    theta = replica.theta.clone().requires_grad_(True)
    rows = data.rows(batch)
    x, y = torch.from_numpy(rows.inputs).to(replica.device), torch.from_numpy(rows.labels).to(replica.device)
    losses = replica.forward.losses(replica.forward.call(theta, x), x, y)[0]
    return torch.stack([torch.autograd.grad(l, theta, retain_graph=True)[0] for l in losses]).double()


def gradient_errors(train_cfg, replica, data, batches, reps, allocator_state=None) -> np.ndarray:
    """Per batch: MSE, variance and bias² of the estimate ĝ against the backprop gradient g, ‖g‖²
    and gᵀĝ̄. Each batch is pinned and the step index varied (new query seeds and allocator draws,
    the same for every allocator). `allocator_state` (allocator.state of a training run) puts a
    learned λ into the flops allocator."""
    executor = Capture([replica])
    engine = Engine(train_cfg, executor, data, replica.d)
    if allocator_state is not None:
        engine.allocator.state = allocator_state
    out = []
    for b, batch in enumerate(batches):
        g = example_gradients(replica, data, batch).mean(0)
        est = []
        for r in range(reps):
            engine.step(b * reps + r, batch=batch)
            est.append(replica.gradient(executor.message).double())  # Σ c_s u(seed_s), or output space's
        est = torch.stack(est)
        mse = ((est - g) ** 2).sum(1).mean().item()
        var = ((est - est.mean(0)) ** 2).sum().item() / (reps - 1)
        out.append((mse, var, mse - var, (g ** 2).sum().item(), (g @ est.mean(0)).item()))
    return np.array(out)  # [batches, (MSE, variance, bias², ‖g‖², gᵀĝ̄)]


def oracle_ratio(replica, data, batches, budget, a_min):
    """V(A*)/V(uniform) for the exact integer optimum A* on the true c_j = (d − 1)‖g_j‖² (lr estimator,
    Rademacher noise): the most any allocator could gain. Also the uniform MSE the theory predicts."""
    v_opt = v_unif = 0.0
    for batch in batches:
        c = (replica.d - 1) * (example_gradients(replica, data, batch) ** 2).sum(1).numpy()
        v_opt += variance_objective(c, optimal_integer_allocation(c, budget, a_min))
        v_unif += variance_objective(c, np.full(len(c), budget // len(c)))
    return v_opt / v_unif, v_unif / len(batches) / len(batches[0]) ** 2


def jackknife_ratio(num, den):
    """Σ num / Σ den and its leave-one-batch-out standard error."""
    n = len(num)
    loo = (num.sum() - num) / (den.sum() - den)
    return num.sum() / den.sum(), float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
