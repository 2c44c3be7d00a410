"""Small real models and losses shared by the tests."""
import functools

import numpy as np
import torch
from torch import nn

from flops_dist.apps.targets import Projection
from flops_dist.losses import FrozenModelLoss
from flops_dist.data import ArrayDataset


def build_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


def cross_entropy(outputs, labels):
    return nn.functional.cross_entropy(outputs, labels, reduction="none")


def nan_for_class_two(outputs, labels):
    """A loss that is NaN for every example of class 2, like a numerically broken pipeline."""
    loss = nn.functional.cross_entropy(outputs, labels, reduction="none")
    return torch.where(labels == 2, torch.full_like(loss, float("nan")), loss)


def blobs(n=240, seed=0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    centres = rng.normal(size=(3, 10)) * 2
    inputs = centres[labels] + rng.normal(size=(n, 10))
    return ArrayDataset(inputs.astype(np.float32), labels.astype(np.int64))


# --- a black-box target: a projection into the input of a frozen network the trainer never sees into

FROZEN_SEED, PROMPT_DIM = 7, 6


def frozen_network() -> nn.Module:
    """The frozen model: a fixed random 2-layer net from PROMPT_DIM features to 3 classes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FROZEN_SEED)
        net = nn.Sequential(nn.Linear(PROMPT_DIM, 16), nn.Tanh(), nn.Linear(16, 3))
    return net.requires_grad_(False).eval()


class FrozenNetLoss(FrozenModelLoss):
    """Cross-entropy through the frozen net, in this process. It refuses to run with autograd on,
    so a test fails if anything ever tries to differentiate through it."""
    loads = 0

    def load(self, device):
        FrozenNetLoss.loads += 1
        return frozen_network().to(device)

    def __call__(self, outputs, inputs, labels):
        assert not torch.is_grad_enabled(), "the frozen model must never be differentiated"
        return nn.functional.cross_entropy(self.frozen(outputs), labels, reduction="none")

    def scores(self, outputs, inputs):
        return self.frozen(outputs)


def send(stream, array: np.ndarray) -> None:
    """A float32 matrix over a pipe: its two dimensions, then its bytes."""
    array = np.ascontiguousarray(array, np.float32)
    stream.write(np.array(array.shape, np.int64).tobytes() + array.tobytes())
    stream.flush()


def receive(stream) -> np.ndarray | None:
    header = stream.read(16)
    if len(header) < 16:
        return None  # the other side has gone
    rows, cols = np.frombuffer(header, np.int64)
    return np.frombuffer(stream.read(int(rows * cols) * 4), np.float32).reshape(rows, cols).copy()


SUBPROCESS_SERVER = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from models import frozen_network, receive, send
torch.set_num_threads(1)
net = frozen_network()
while (x := receive(sys.stdin.buffer)) is not None:
    with torch.no_grad():
        send(sys.stdout.buffer, net(torch.from_numpy(x)).numpy())
"""


class SubprocessNetLoss(FrozenModelLoss):
    """The same frozen net behind a pipe to another process: a black box flops_dist can only call."""

    def load(self, device):
        import subprocess
        import sys
        from pathlib import Path
        return subprocess.Popen([sys.executable, "-c", SUBPROCESS_SERVER, str(Path(__file__).parent)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _logits(self, outputs):
        send(self.frozen.stdin, outputs.cpu().numpy())
        return torch.from_numpy(receive(self.frozen.stdout))

    def __call__(self, outputs, inputs, labels):
        return nn.functional.cross_entropy(self._logits(outputs), labels, reduction="none")

    def scores(self, outputs, inputs):
        return self._logits(outputs)


def build_projection() -> nn.Module:
    return Projection(10, PROMPT_DIM, seed=1)


def write_parquet(data: ArrayDataset, folder, parts: int = 1, row_group_size: int = 32):
    """`data` as Parquet in `folder`: one file, or `parts` parts of nearly equal size."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = data.inputs[0].size
    table = pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(data.inputs.reshape(-1)), width),
                      "label": pa.array(data.labels)})
    bounds = np.linspace(0, len(data), parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(a, b - a), folder / f"part-{i}.parquet", row_group_size=row_group_size)
    return folder


class Tower(nn.Module):
    """A residual tower and a head, with glue between modules (a residual sum, a mean): the frozen
    prefix of a tail target is the tower. `leak` makes the tower's input depend on the head's
    weights (used before the head runs), so no module of the tower is a frozen prefix."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.leak = leak
        self.embed = nn.Linear(10, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        if self.leak:
            h = h + self.head.weight.sum()
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.unsqueeze(-2).mean(-2))


def build_tower(leak: bool = False) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tower(leak)


class Chain(nn.Module):
    """Modules one after another, with glue (a scale, a mean) between them, like the digits ViT: when
    the last frozen module is replayed, the earlier ones' outputs are computed on and then dropped.
    `skip` adds the input's first features to the head's output, so the input is used past the prefix;
    `gate` keeps the output where the input's first feature is non-zero (as a padding mask does), so
    it is used too, though swapping examples' inputs leaves the output as it was."""

    def __init__(self, skip: bool = False, gate: bool = False):
        super().__init__()
        self.skip, self.gate = skip, gate
        self.embed = nn.Linear(10, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(2.0 * self.embed(x).unsqueeze(-2)).mean(-2)
        out = self.head(self.norm(h))
        if self.gate:
            out = out * (x[..., :1] != 0)
        return out + x[..., :3] if self.skip else out


def build_chain(leak: bool = False, skip: bool = False, gate: bool = False) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Chain(skip, gate)


build_skip_chain = functools.partial(build_chain, skip=True)
build_gated_chain = functools.partial(build_chain, gate=True)
