"""Seeded, counter-based noise: u = noise(seed, d) is regenerated anywhere from an integer seed.

A counter hash (Wellons' lowbias32) of (seed, counter) gives 32 random bits, so there is no
generator state and any slice [offset, offset + numel) can be made on its own.
- Rademacher: element i is bit (i mod 32) of the hash of counter i // 32, so one hash makes 32
  signs. Integer arithmetic only: bit-exact on every device.
- Gaussian: Box-Muller on the hashes of counters 2i and 2i + 1: identical on devices of the
  same type.
On the CPU the hash runs in numpy's uint32, whose multiplication wraps by definition; on other
devices in torch int64 with products kept below 2**63. Both give the same bits (a test checks).

Because any slice can be made alone, noise is never made whole: `blocks` cuts a [rows, numel] request
into pieces of at most BLOCK elements, so the temporary memory of a perturbation or an update is
bounded whatever d is (a Gaussian element briefly costs about 56 bytes while it is made).
"""
from __future__ import annotations

import numpy as np
import torch

KINDS = ("gaussian", "rademacher")
_MASK32 = 0xFFFFFFFF
_C1, _C2, _M1, _M2 = 0x9E3779B9, 0x632BE5AB, 0x7FEB352D, 0x846CA68B


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    # (x * m) mod 2**32 without int64 overflow: multiply the two 16-bit halves of x separately.
    lo = (x & 0xFFFF) * m
    hi = (((x >> 16) * m) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(x):
    """lowbias32, on numpy uint32 arrays or on int64 tensors holding values in [0, 2**32)."""
    if isinstance(x, np.ndarray):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(_M1)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(_M2)
        return x ^ (x >> np.uint32(16))
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def _words_numpy(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """32 random bits for every (seed, counter) pair; seeds [Q], counters [n] -> uint32 [Q, n]."""
    s = seeds.astype(np.uint64)
    lo, hi = (s & np.uint64(_MASK32)).astype(np.uint32), (s >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        k1 = hash32(lo ^ np.uint32(_C1))
        k2 = hash32(hi ^ k1 ^ np.uint32(_C2))  # the constant keeps k2 from equalling hash32(k1)
        c = counters.astype(np.uint64)
        c_lo, c_hi = (c & np.uint64(_MASK32)).astype(np.uint32), (c >> np.uint64(32)).astype(np.uint32)
        x = hash32(c_lo[None, :] + k1[:, None])
        return hash32(x ^ k2[:, None] ^ c_hi[None, :])


def _words_torch(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The same bits as _words_numpy, as int64 tensors on any device."""
    seeds = seeds.reshape(-1, 1)
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    k1 = hash32(lo ^ _C1)
    k2 = hash32(hi ^ k1 ^ _C2)
    x = hash32(((counters & _MASK32).reshape(1, -1) + k1) & _MASK32)
    return hash32(x ^ k2 ^ ((counters >> 32) & _MASK32).reshape(1, -1))


# the eight signs of every byte, bit 0 first (1 − 2·bit), so a hash word's 32 signs are four lookups;
# and the same as float32 sign bits alone: c·(±1) is c with its sign bit flipped where u is −1
_SIGNS_OF_BYTE = (1 - 2 * np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
                  .astype(np.int8)).astype(np.float32)
_SIGN_BITS_OF_BYTE = _SIGNS_OF_BYTE.view(np.uint32) & np.uint32(1 << 31)


def _per_byte(table: np.ndarray, seeds: np.ndarray, numel: int, offset: int) -> tuple[np.ndarray, int]:
    """table[b] for every byte b of the hash words that hold elements [offset, offset + numel), in
    element order (bit i of word k at 32k + i): [seeds, 32·words], and where element `offset` is.
    One lookup pass, where unpacking the bits and scaling them took three (measured 1.6× slower)."""
    first, last = offset >> 5, (offset + numel - 1) >> 5
    w = _words_numpy(seeds, np.arange(first, last + 1)).astype("<u4")  # explicit byte order
    return np.take(table, w.view(np.uint8), axis=0).reshape(len(seeds), -1), offset - 32 * first


def _rademacher_numpy(seeds: np.ndarray, numel: int, offset: int) -> torch.Tensor:
    signs, start = _per_byte(_SIGNS_OF_BYTE, seeds, numel, offset)
    return torch.from_numpy(signs[:, start:start + numel])


def _rademacher_torch(seeds: np.ndarray, numel: int, offset: int, device: torch.device) -> torch.Tensor:
    first, last = offset >> 5, (offset + numel - 1) >> 5
    w = _words_torch(torch.as_tensor(seeds, device=device), torch.arange(first, last + 1, device=device))
    bit_index = torch.arange(offset, offset + numel, device=device)
    bits = (w[:, (bit_index >> 5) - first] >> (bit_index & 31)) & 1
    return (1 - 2 * bits).to(torch.float32)


def noise_batch(seeds, numel: int, kind: str = "rademacher", offset: int = 0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise for several seeds at once: float32 [len(seeds), numel], row q = noise(seeds[q])."""
    if kind not in KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(KINDS)}")
    seeds = np.array(seeds, dtype=np.int64).reshape(-1)
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    if kind == "rademacher":
        return _rademacher_numpy(seeds, numel, offset) if on_cpu else _rademacher_torch(seeds, numel, offset, device)
    counters = np.arange(2 * offset, 2 * (offset + numel))
    if on_cpu:
        w = torch.from_numpy(_words_numpy(seeds, counters).astype(np.int64))
    else:
        w = _words_torch(torch.as_tensor(seeds, device=device), torch.as_tensor(counters, device=device))
    w = w.reshape(len(seeds), numel, 2)
    u1 = (w[..., 0].to(torch.float64) + 0.5) * 2.0**-32  # in (0, 1): log is finite
    u2 = w[..., 1].to(torch.float64) * 2.0**-32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(torch.float32)


BLOCK = 1 << 20  # noise elements made at once


def blocks(numel: int, rows: int = 1):
    """(start, stop) element ranges and how many rows to make at once, with rows·length ≤ BLOCK
    (a row alone may not fit: then it is cut)."""
    span = max(1, min(numel, BLOCK))
    per = max(1, BLOCK // span)
    return [(a, min(numel, a + span)) for a in range(0, numel, span)], min(per, max(rows, 1))


def accumulate(out: torch.Tensor, seeds, coefficients, kind: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """out += Σ_s c_s · u(seed_s)[offset : offset + len(out)], in place, c_s taken in float32. The
    terms are added in message order at every element, so the bits equal adding whole noise vectors
    one by one."""
    seeds = np.asarray(seeds, np.int64).reshape(-1)
    with np.errstate(over="ignore"):  # beyond float32 it becomes inf, and the update is refused (all_finite)
        coefficients = np.asarray(coefficients, np.float32).reshape(-1)
    ranges, per = blocks(out.numel(), len(seeds))
    for start, stop in ranges:
        part = out[start:stop]
        for s0 in range(0, len(seeds), per):
            chosen, c = seeds[s0:s0 + per], coefficients[s0:s0 + per]
            if kind == "rademacher" and out.device.type == "cpu" and len(chosen) > 1 and stop - start > 1:
                _add_signed_terms(part, chosen, c, offset + start)
                continue
            for row, c_s in zip(noise_batch(chosen, stop - start, kind, offset + start, out.device), c.tolist()):
                part.add_(row, alpha=c_s)
    return out


def _add_signed_terms(part: torch.Tensor, seeds: np.ndarray, coefficients: np.ndarray, offset: int) -> None:
    """part += Σ c_s·u(seed_s) in order, for Rademacher noise on the CPU. c_s·(±1) is c_s with its
    sign bit flipped where u is −1, so the terms are made as bits in one pass (no ±1 rows to
    multiply). numpy sums down axis 0 one row after another at every element (its pairwise
    summation only runs along a contiguous reduced axis, which a row of two or more elements is
    not), so folding `part` into the first row gives the loop's bits, in one block of memory."""
    terms, start = _per_byte(_SIGN_BITS_OF_BYTE, seeds, part.numel(), offset)
    np.bitwise_xor(terms, coefficients.view(np.uint32)[:, None], out=terms)  # before slicing: one contiguous pass
    terms = terms.view(np.float32)[:, start:start + part.numel()]
    terms[0] += part.numpy()
    part.copy_(torch.from_numpy(np.add.reduce(terms, axis=0)))


def noise(seed: int, numel: int, kind: str = "rademacher", offset: int = 0,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """u(seed)[offset : offset + numel] as float32."""
    return noise_batch([seed], numel, kind, offset, device)[0]
