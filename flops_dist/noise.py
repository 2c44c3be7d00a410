"""Seeded, counter-based noise: u = noise(seed, d) is regenerated anywhere from an integer seed.

A counter hash (Wellons' lowbias32) of (seed, index) gives 32 random bits per element, so there is
no generator state and any slice [offset, offset + numel) can be made on its own. All integer
arithmetic stays below 2**63 in int64, so the Rademacher noise is bit-exact on every device.
Gaussian noise is Box-Muller on two hashed uniforms: identical on devices of the same type.
"""
from __future__ import annotations

import numpy as np
import torch

KINDS = ("gaussian", "rademacher")
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    # (x * m) mod 2**32 without int64 overflow: multiply the two 16-bit halves of x separately.
    lo = (x & 0xFFFF) * m
    hi = (((x >> 16) * m) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _keys(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    k1 = hash32(lo ^ 0x9E3779B9)
    k2 = hash32(hi ^ k1 ^ 0x632BE5AB)  # the constant keeps k2 from equalling hash32(k1)
    return k1, k2


def _bits(seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """32 random bits for every (seed, index) pair; seeds [Q, 1], index [1, n] -> [Q, n]."""
    k1, k2 = _keys(seeds)
    x = hash32(((index & _MASK32) + k1) & _MASK32)
    return hash32(x ^ k2 ^ ((index >> 32) & _MASK32))


def noise_batch(seeds, numel: int, kind: str = "rademacher", offset: int = 0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise for several seeds at once: float32 [len(seeds), numel], row q = noise(seeds[q])."""
    if kind not in KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(KINDS)}")
    seeds = torch.as_tensor(np.array(seeds, dtype=np.int64), device=device).reshape(-1, 1)
    if kind == "rademacher":
        index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device).reshape(1, -1)
        bit = _bits(seeds, index) >> 31
        return (1 - 2 * bit).to(torch.float32)
    index = torch.arange(2 * offset, 2 * (offset + numel), dtype=torch.int64, device=device)
    bits = _bits(seeds, index.reshape(1, -1)).reshape(seeds.shape[0], numel, 2)
    u1 = (bits[..., 0].to(torch.float64) + 0.5) * 2.0**-32  # in (0, 1): log is finite
    u2 = bits[..., 1].to(torch.float64) * 2.0**-32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.to(torch.float32)


def noise(seed: int, numel: int, kind: str = "rademacher", offset: int = 0,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """u(seed)[offset : offset + numel] as float32."""
    return noise_batch([seed], numel, kind, offset, device)[0]
