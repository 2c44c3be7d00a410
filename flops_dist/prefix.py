"""Frozen-prefix reuse: the modules that run before the first target parameter is used do not
depend on the perturbation, so their outputs are computed once per example per step (in the clean
forward) and every query runs only the rest of the network.

No model surgery: the prefix is found by watching one forward with module hooks, and a query swaps
each prefix module's `forward` for a lookup of its cached output while it runs (the module tree and
its parameters are untouched). A module is kept only if it is called once per forward, its output is
a batch-first tensor or a structure of them, and that output stays bit-identical when the target
is perturbed (checked once, at start).

A prefix output that the network's output does not depend on (in a ViT whose last prefix module is
the final norm, the blocks' outputs are only computed on and dropped) is dead: found at start by
replacing it with NaN and with other numbers, it is kept for one example only and replayed to every
query as that one, so a query neither gathers it nor computes on it row by row. The network's own
input is tested too (replaced by zeros and by other examples' inputs, the output stays
bit-identical): where it is dead, a vmapped query gets one example's input, unbatched, and the
model's code before the replayed modules (a reshape into patches) runs once per chunk, not once
per query.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils import _pytree as pytree


def _batch_first(output, rows: int) -> bool:
    leaves = pytree.tree_leaves(output)
    return bool(leaves) and all(torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows for v in leaves)


def _watch(model: nn.Module, run) -> tuple[list[tuple[str, str]], dict[str, object]]:
    """Run `run()` and return the modules' (event, name) sequence and each module's last output."""
    events, outputs, handles = [], {}, []

    def ended(name, output):  # a forward hook that returned something would replace the output
        events.append(("end", name))
        outputs[name] = output

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: events.append(("start", n)) and None))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: ended(n, o)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return events, outputs


def _candidates(model: nn.Module, events, boundary: set[str]) -> list[str]:
    """Modules called once, ended before the first boundary module starts; not the root."""
    first = next((i for i, (kind, n) in enumerate(events) if kind == "start" and n in boundary), None)
    if first is None:
        return []
    calls: dict[str, int] = {}
    for kind, n in events:
        calls[n] = calls.get(n, 0) + (kind == "start")
    return [n for kind, n in events[:first] if kind == "end" and n and calls[n] == 1]


class FrozenPrefix:
    """The outermost prefix modules, by name. `capture` records their outputs during a clean
    forward; `cache(chunks)` joins them into per-example tensors; `replay(values)` runs a forward
    with those outputs in place of the modules' work."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, list(names)
        self.modules = {n: model.get_submodule(n) for n in self.names}
        self.dead: set[str] = set()  # the outputs the network's output does not depend on (find)
        self.input_dead = False  # whether, with the outputs replayed, the network's input is not used either

    @classmethod
    def find(cls, model: nn.Module, owners: set[str], run_on, run_perturbed, inputs: torch.Tensor) -> "FrozenPrefix | None":
        """`owners`: the modules that hold a target parameter (or the module a user named as the
        boundary). `run_on(x)`: a forward on examples x at θ; `run_perturbed()`: one on `inputs` at a
        far-off θ."""
        rows, run_clean = len(inputs), lambda: run_on(inputs)
        events, clean = _watch(model, run_clean)
        names = [n for n in _candidates(model, events, owners) if _batch_first(clean[n], rows)]
        if not names:  # nothing runs before the target: no far-off θ to make (a d-sized copy)
            return None
        _, moved = _watch(model, run_perturbed)
        names = [n for n in names if n in moved and _same(clean[n], moved[n])]
        outermost = [n for n in names if not any(n.startswith(p + ".") for p in names)]
        if not outermost:
            return None
        prefix = cls(model, outermost)
        values = {n: clean[n] for n in outermost}
        with prefix.replay(values):
            reference = run_clean()  # the output the replayed network must keep, bit for bit
        prefix.dead = prefix._dead_outputs(run_clean, values, reference)
        prefix.input_dead = prefix._input_dead(run_on, inputs, values, reference)
        return prefix

    def _dead_outputs(self, run, values: dict[str, object], reference) -> set[str]:
        """The prefix modules whose outputs the network's output does not depend on: replaced by
        NaN, or by other finite numbers, each leaves the output bit-identical."""
        dead = set()
        for name in self.names:
            floats = all(torch.is_tensor(v) and v.is_floating_point() for v in pytree.tree_leaves(values[name]))
            stand_ins = (lambda v: torch.full_like(v, float("nan")), lambda v: 2 * v + 1)
            if floats and all(self._same_output(run, {**values, name: pytree.tree_map(f, values[name])}, reference)
                              for f in stand_ins):
                dead.add(name)
        return dead

    def _input_dead(self, run_on, inputs: torch.Tensor, values: dict[str, object], reference) -> bool:
        """Whether, with the prefix replayed, other inputs leave the output bit-identical: zeros (a
        mask made from the input changes) and the rows rolled by one (other examples' values). Both
        are inputs any model accepts; NaN or scaled ones would be bad indices where the model
        turns its input into token ids."""
        return all(self._same_output(lambda: run_on(other), values, reference)
                   for other in (torch.zeros_like(inputs), inputs.roll(1, 0)))

    def _same_output(self, run, values, reference) -> bool:
        with self.replay(values):
            return _same(run(), reference)

    @contextlib.contextmanager
    def capture(self, store: list):
        """Append {name: output} of every forward run inside, one dict per forward."""
        current, handles = {}, []
        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: current.__setitem__(n, o)))  # returns None
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        store.append(current)

    def cache(self, captured: list[dict]) -> dict[str, object]:
        """Per-module outputs of several forwards joined along the batch dimension (a dead one:
        its first example's)."""
        return {n: pytree.tree_map(lambda v: v[:1], captured[0][n]) if n in self.dead else
                pytree.tree_map(lambda *parts: torch.cat(parts), *[c[n] for c in captured]) for n in self.names}

    def portable(self, captured: list[dict]) -> list[dict]:
        """One clean chunk's outputs as another replica needs them (`on_device` takes them back), a
        dead one cut to its first example: numpy arrays, which Ray passes without pickling (a pickled
        tensor cost the coordinator about 1 ms a step) and which, views or not, carry only their own
        elements; bfloat16 as a tensor of its own (a view would pickle its whole base)."""
        own = lambda v: v.detach().cpu().clone() if v.dtype == torch.bfloat16 else v.detach().cpu().numpy()
        return [{n: pytree.tree_map(lambda v: own(v[:1]) if n in self.dead else own(v), c[n]) for n in self.names}
                for c in captured]

    @staticmethod
    def on_device(portable: list[dict], device: torch.device) -> list[dict]:
        """`portable`'s outputs as tensors on this device (a copy: Ray's arrays are read-only)."""
        return pytree.tree_map(lambda v: v.to(device) if torch.is_tensor(v) else torch.tensor(v, device=device),
                               portable)

    def take(self, values: dict[str, object], examples: torch.Tensor) -> dict[str, object]:
        """The held outputs of these batch positions; a dead one's single row, broadcast to them."""
        rows = len(examples)
        return {n: pytree.tree_map(lambda v: v.expand(rows, *v.shape[1:]) if n in self.dead else v[examples], v)
                for n, v in values.items()}

    def take_live(self, values: dict[str, object], examples: torch.Tensor) -> tuple[dict, dict]:
        """For vmap: the live outputs of these positions, one per row, and the dead ones' [1, ...]
        rows, which a vmapped query gets unbatched."""
        return ({n: pytree.tree_map(lambda v: v[examples], v) for n, v in values.items() if n not in self.dead},
                {n: v for n, v in values.items() if n in self.dead})

    @contextlib.contextmanager
    def replay(self, values: dict[str, object]):
        """Inside, each prefix module returns its entry in `values` without running."""
        for name, module in self.modules.items():
            module.forward = lambda *a, v=values[name], **k: v
        try:
            yield
        finally:
            for module in self.modules.values():
                del module.forward


def _same(a, b) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.is_tensor(x) and torch.is_tensor(y) and torch.equal(x, y)
                                      for x, y in zip(la, lb))
