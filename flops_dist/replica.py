"""A model replica: the few verbs a worker has. Plain Python, so the local reference step and the
Ray worker run the very same code.

θ is a flat float32 master vector; the module's parameters keep their base values and every
forward receives θ (or θ + σu) through functional_call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import ArrayDataset
from .estimators import variance_scale
from .losses import as_loss
from .outputs import LayerInputs, OutputSpace, kappa
from .sharding import QueryChunks, chunk_examples
from .targets import PerturbedForward, Target
from .update import (OptimizerConfig, UpdateMessage, all_finite, apply_update, init_optimizer_state,
                     parameter_hash, reconstruct_gradient)


@dataclass(frozen=True)
class ReplicaSpec:
    include: list[str] = field(default_factory=lambda: ["all"])
    embedding_module: str = ""
    frozen_prefix: str = "auto"
    sigma: float = 1e-2
    noise: str = "rademacher"
    noise_space: str = "weights"
    layer_sigma: str = "rms"
    optimizer: OptimizerConfig = OptimizerConfig()
    threads: int = 1
    device: str = "auto"

    @classmethod
    def from_config(cls, cfg, **overrides) -> "ReplicaSpec":
        """The spec of a run's replicas, from its Config."""
        t = cfg.train
        return cls(**{"include": cfg.target.include, "embedding_module": cfg.target.embedding_module,
                      "frozen_prefix": cfg.target.frozen_prefix,
                      "sigma": t.sigma, "noise": t.noise, "noise_space": t.noise_space,
                      "layer_sigma": t.layer_sigma, "optimizer": t.optimizer_config(),
                      "threads": cfg.cluster.threads_per_worker, **overrides})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class NonFiniteUpdate(RuntimeError):
    """An update that would put NaN or inf into θ: refused, and the run stops before saving."""


class Replica:
    def __init__(self, model: nn.Module, loss_fn, sample: ArrayDataset, spec: ReplicaSpec):
        # the same thread count everywhere: reductions over θ must not depend on the machine
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = pick_device(spec.device)
        self.model = model.to(self.device).eval()
        loss = as_loss(loss_fn)
        loss.ensure_loaded(self.device)  # a frozen model behind the target: once per replica
        self.target = Target.select(self.model, spec.include)
        self._float32_params = self._theta_slices()
        self.theta = self.target.flatten(self.model).to(self.device)
        self.opt_state = init_optimizer_state(spec.optimizer, self.target.numel, self.device)
        self.forward = PerturbedForward(self.model, self.target, loss, spec.sigma, spec.noise,
                                        self.device, spec.embedding_module or None)
        self.outputs = None if spec.noise_space == "weights" else \
            OutputSpace(self.model, self.target, spec.layer_sigma, spec.noise)
        self.layer_inputs, self.layer_inputs_at = None, -1  # output space: the batch's layer inputs, at which θ
        # the rows this replica holds: a few sample examples, then each step's batch as it comes
        self.inputs, self.labels = self._tensors(sample)
        if len(self.labels):  # a replica that only replays updates (verify) holds no examples
            self.forward.find_prefix(self.theta, self.inputs[:16], spec.frozen_prefix)
        self.prefix_chunks, self.clean_rows = {}, 1  # set by each step's clean forward
        self.updates_applied = 0

    def _tensors(self, data: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(data.inputs, device=self.device), torch.tensor(data.labels, device=self.device)

    def _theta_slices(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, its offset in θ) of the float32 target parameters, which share θ's memory."""
        params, out, start = dict(self.model.named_parameters()), [], 0
        for name, shape, dtype in zip(self.target.names, self.target.shapes, self.target.dtypes):
            if dtype == torch.float32:
                out.append((params[name], start))
            start += shape.numel()
        return out

    @property
    def theta(self) -> torch.Tensor:
        return self._theta

    @theta.setter
    def theta(self, value: torch.Tensor) -> None:
        """Set θ, and make the model's float32 target parameters views of it: forwards take θ through
        functional_call and never read them, so a copy of their own would only double the memory."""
        self._theta = value
        for param, start in self._float32_params:
            param.data = value[start:start + param.numel()].view(param.shape)

    @property
    def d(self) -> int:
        return self.target.numel

    def noise_cost(self, rows: int = 16) -> float:
        """Noise generation for one seed, in forward-equivalents of one example: the sharding cost
        model's weight. Timing only steers the assignment, never the bits."""
        x, y = self.inputs[:rows], self.labels[:rows]
        self.forward.clean(self.theta, x, y)  # warm-up
        began = time.perf_counter()
        self.forward.clean(self.theta, x, y)
        forward = (time.perf_counter() - began) / len(y)
        began = time.perf_counter()
        self.forward.target.perturbed(self.theta, [0], 1.0, self.spec.noise)
        return (time.perf_counter() - began) / max(forward, 1e-9)

    def clean_forward(self, batch: ArrayDataset, rows: np.ndarray):
        """Hold the step's batch (its rows, no others), then losses [n, C], embeddings [n, C, m] and
        κ [n, C] (estimators.estimate) at θ for chunks of positions in it, and with a frozen prefix
        the prefix outputs of those chunks, {chunk: portable outputs} (None without one). They are
        kept here for the step's queries, and other replicas can be given them (`evaluate`)."""
        self.inputs, self.labels = self._tensors(batch)
        self.prefix_chunks = {}  # canonical clean chunk i (positions i·C ...) -> its prefix outputs
        self.clean_rows = max(rows.shape[1], 1)
        if self.outputs is not None:
            return (*self._clean_every_chunk(rows), None)
        losses, embeddings = [], []
        for row in torch.tensor(rows, device=self.device):  # a copy: Ray's arrays are read-only
            loss, emb = self._clean_chunk(row)
            losses.append(loss)
            embeddings.append(emb)
        prefix = None if self.forward.prefix is None else \
            {i: self.forward.prefix.portable(captured) for i, captured in self.prefix_chunks.items()}
        if not losses:
            return (np.zeros((0, rows.shape[1]), np.float32), np.zeros((0, rows.shape[1], 0), np.float32),
                    np.zeros((0, rows.shape[1])), prefix)
        kappa = np.full(rows.shape, variance_scale(self.d, self.spec.noise))
        return np.stack(losses), np.stack(embeddings), kappa, prefix

    def _clean_chunk(self, row: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Losses and embeddings of one canonical clean chunk; its prefix outputs are kept."""
        captured = []
        loss, emb = self.forward.clean(self.theta, self.inputs[row], self.labels[row], captured)
        self.prefix_chunks[int(row[0]) // self.clean_rows] = captured
        return loss.cpu().numpy(), emb.cpu().numpy()

    def _clean_every_chunk(self, rows: np.ndarray):
        """Output space: every replica runs the whole batch's clean forward (one forward per example
        per step), recording each target layer's inputs, since it rebuilds ĝ from all of them; it
        returns the dealt rows' results. The chunks are canonical, so all replicas get the same bits."""
        every = torch.tensor(chunk_examples(np.arange(len(self.labels)), self.clean_rows)[0], device=self.device)
        losses, embeddings, records = [], [], []
        for row in every:
            with self.outputs.recording(records):
                loss, emb = self._clean_chunk(row)
            losses.append(loss)
            embeddings.append(emb)
        self.layer_inputs = LayerInputs({k: torch.cat([rec.x[k] for rec in records]) for k in records[0].x},
                                        {k: torch.cat([rec.r[k] for rec in records]) for k in records[0].r})
        self.layer_inputs_at = self.updates_applied  # valid while θ stays as it is
        k = kappa(self.outputs.layers, self.layer_inputs).cpu().numpy().reshape(len(every), -1)
        pick = np.asarray(rows[:, 0] // self.clean_rows, np.int64)
        return np.stack(losses)[pick], np.stack(embeddings)[pick], k[pick]

    def _hold_prefix(self, examples: np.ndarray, given: dict | None = None) -> np.ndarray:
        """Make sure the prefix outputs of these batch positions are held: from `given` (other
        replicas' clean chunks, {chunk: portable outputs}), else a canonical clean chunk that another
        replica ran is run here too, so the bits are the same. Returns each position's row in the
        held outputs."""
        c = self.clean_rows
        for i, captured in (given or {}).items():
            if i not in self.prefix_chunks:
                self.prefix_chunks[i] = self.forward.prefix.on_device(captured, self.device)
        for i in sorted(set(np.unique(examples // c).tolist()) - set(self.prefix_chunks)):
            row = torch.tensor(chunk_examples(np.arange(len(self.labels)), c)[0][i], device=self.device)
            captured = []
            self.forward.clean(self.theta, self.inputs[row], self.labels[row], captured)
            self.prefix_chunks[i] = captured
        order = sorted(self.prefix_chunks)
        self.forward.hold([part for i in order for part in self.prefix_chunks[i]])
        rank = np.full(max(order) + 1, -1, np.int64)
        rank[order] = np.arange(len(order))
        return rank[examples // c] * c + examples % c

    def evaluate(self, chunks: QueryChunks, prefix: dict | None = None) -> np.ndarray:
        """Losses [n, C] of the perturbed queries, one batched forward per chunk. `prefix`: the
        prefix outputs of clean chunks that other replicas ran, as their clean_forward gave them."""
        out = np.empty(chunks.examples.shape, np.float32)
        held = self._hold_prefix(chunks.examples, prefix) if self.forward.prefix is not None else None
        examples = torch.tensor(chunks.examples, device=self.device)  # a copy: Ray's arrays are read-only
        for i, (ex, seeds, signs) in enumerate(zip(examples, chunks.seeds, chunks.signs)):
            x, y = self.inputs[ex], self.labels[ex]
            at = None if held is None else torch.tensor(held[i], device=self.device)
            if self.outputs is not None:
                loss = self._output_queries(ex, seeds, signs, x, y, at)
            elif chunks.shared:
                loss = self.forward.shared(self.theta, int(seeds[0]), int(signs[0]), x, y, at)
            else:
                loss = self.forward.independent(self.theta, seeds, signs, x, y, at)
            out[i] = loss.cpu().numpy()
        return out

    def _held_layer_inputs(self) -> LayerInputs:
        if self.layer_inputs is None or self.layer_inputs_at != self.updates_applied:
            raise RuntimeError(
                f"step {self.updates_applied}: output-space noise needs the step's layer inputs from this replica's "
                "clean forward at the current θ; replaying an output-space update log without its batches "
                "is not supported")
        return self.layer_inputs

    def _output_queries(self, examples, seeds, signs, x, y, at) -> torch.Tensor:
        """Losses of one chunk of output-space queries: a plain batched forward at θ whose target
        layers add σ·r_lj·sign·ε_l(seed) to their outputs."""
        held = self._held_layer_inputs()
        scale = {name: self.spec.sigma * r[examples] for name, r in held.r.items()}
        signs = torch.tensor(signs, dtype=torch.float32, device=self.device)
        with self.outputs.noisy(seeds, signs, scale):
            return self.forward.at_theta(self.theta, x, y, at)

    def gradient(self, msg: UpdateMessage) -> torch.Tensor:
        """ĝ of an update message, flat [d]: Σ c_s u(seed_s), or in output space Σ c_s G(seed_s)."""
        if self.outputs is None:
            return reconstruct_gradient(msg, self.d, self.spec.noise, self.device)
        return self.outputs.gradient(msg.seeds, msg.coefficients, self._held_layer_inputs())

    def apply(self, msg: UpdateMessage) -> None:
        """Apply U_t once: a message that arrives again (re-sent after a failure) is ignored."""
        if msg.step < self.updates_applied:
            return
        if msg.step > self.updates_applied:
            raise RuntimeError(f"update for step {msg.step} reached a replica at step {self.updates_applied}")
        gradient = None if self.outputs is None else self.gradient(msg)
        theta, opt_state = apply_update(self.theta, self.opt_state, msg, self.spec.optimizer, self.spec.noise, gradient)
        if not all_finite(theta, *opt_state.values()):
            largest = float(np.abs(msg.coefficients).max()) if len(msg.coefficients) else 0.0
            raise NonFiniteUpdate(
                f"step {msg.step}: the update would make θ or the optimizer state non-finite (learning rate "
                f"{msg.learning_rate}, largest |coefficient| {largest:.3g}); θ is kept as it was. Likely "
                "causes: a learning rate or σ too large, or a damaged update log")
        self.theta, self.opt_state = theta, opt_state
        self.updates_applied += 1

    def hash(self) -> str:
        return parameter_hash(self.theta, self.opt_state)

    def snapshot_tensors(self) -> dict[str, np.ndarray]:
        """θ and the optimizer state, for a snapshot."""
        out = {"theta": self.theta.detach().cpu().numpy()}
        out.update({f"opt.{k}": v.detach().cpu().numpy() for k, v in self.opt_state.items()})
        return out

    def restore(self, tensors: dict[str, np.ndarray], step: int, messages: list[UpdateMessage]) -> str:
        """Load a snapshot taken before `step`, replay the update log from there; returns the hash."""
        theta = torch.tensor(tensors["theta"], device=self.device)
        if theta.shape != self.theta.shape:
            raise ValueError(f"snapshot θ has {theta.numel()} values, the target has {self.theta.numel()}")
        self.theta = theta
        self.opt_state = {k[4:]: torch.tensor(v, device=self.device) for k, v in tensors.items() if k.startswith("opt.")}
        self.updates_applied = step
        return self.replay(messages)

    def replay(self, messages: list[UpdateMessage]) -> str:
        """Apply logged updates in order; returns the hash of θ after them."""
        for msg in messages:
            self.apply(msg)
        return self.hash()

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's full state with θ written in, as numpy arrays (for safetensors). numpy has no
        bfloat16, so bf16 tensors are written as float32 (exactly); loading casts them back."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for name, value in self.target.unflatten(self.theta).items():
            state[name] = value.detach().cpu()
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).contiguous().numpy() for k, v in state.items()}

    def score(self, dataset, metric: str, chunk: int = 256) -> float:
        """Accuracy (argmax of outputs) or mean loss at θ on a held-out dataset (any with batches())."""
        return sum(self.score_sum(batch, metric) for batch in dataset.batches(chunk)) / max(len(dataset), 1)

    @torch.no_grad()
    def score_sum(self, batch: ArrayDataset, metric: str) -> float:
        """Correct predictions, or summed loss, over one batch of held-out examples."""
        x, y = self._tensors(batch)
        outputs = self.forward.call(self.theta, x)
        if metric == "accuracy":
            return float((self.forward.scores(outputs, x).argmax(-1) == y).sum())
        return float(self.forward.losses(outputs, x, y)[0].sum())
