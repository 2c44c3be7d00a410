"""The worker actor: a thin Ray shell around a Replica. One GPU each when the cluster has GPUs."""
from __future__ import annotations

import ctypes
import os
import socket
import time

import ray
import torch

from .metrics import peak_rss_bytes
from .replica import Replica


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> None:
    """By default glibc hands a freed block of a few MB back to the kernel, so each chunk's noise and
    perturbed parameters were page-faulted in afresh: about half the time of making them on the main
    job (measured). The worker's process is ours: it keeps blocks under 16 MB, and up to 32 MB of free
    heap, for reuse. Larger ones, such as a large target's θ, still come and go whole (bench/memory.py:
    MiniLM's every weight peaks where it did, 912 MB against 923)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its allocator is left as it is
    libc.mallopt(M_MMAP_THRESHOLD, 16 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 32 << 20)


class Worker:
    def __init__(self, model, loss_fn, sample, spec):
        keep_freed_memory()
        self.replica = Replica(model, loss_fn, sample, spec)

    def info(self) -> dict:
        return {"d": self.replica.d, "device": str(self.replica.device), "host": socket.gethostname(),
                "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "updates_applied": self.replica.updates_applied, "noise_cost": self.replica.noise_cost(),
                "frozen_prefix": self.replica.forward.prefix is not None}

    def clean_forward(self, batch, rows, update=None):
        """The last step's update, where it rides along, is applied first (not timed)."""
        if update is not None:
            self.replica.apply(update)
        return self._timed(self.replica.clean_forward, batch, rows)

    def evaluate(self, chunks, prefix=None):
        return self._timed(self.replica.evaluate, chunks, prefix)

    @staticmethod
    def _timed(verb, *args):
        """(the verb's result, its seconds): the coordinator deals by measured throughput."""
        began = time.perf_counter()
        result = verb(*args)
        return result, time.perf_counter() - began

    def apply(self, msg) -> None:
        self.replica.apply(msg)

    def peak_memory(self) -> int:
        """Peak bytes: the process's resident memory, or on a GPU the device memory torch allocated."""
        if self.replica.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.replica.device)
        return peak_rss_bytes()

    def hash(self) -> str:
        return self.replica.hash()

    def snapshot(self):
        return self.replica.snapshot_tensors(), self.replica.updates_applied, self.replica.hash()

    def restore(self, tensors, step: int, messages) -> str:
        return self.replica.restore(tensors, step, messages)

    def replay(self, messages) -> str:
        return self.replica.replay(messages)

    def state_dict(self):
        return self.replica.state_dict()

    def score_sum(self, batch, metric: str) -> float:
        return self.replica.score_sum(batch, metric)


RemoteWorker = ray.remote(Worker)
