"""A tiny Vision Transformer for the 8x8 scikit-learn digits.

Written to run under ``torch.func.vmap`` over ``functional_call`` with batched
parameters: attention is plain Linear + matmul + softmax (no fused kernels, no
nn.MultiheadAttention), nothing is modified in place, and no Python branch
depends on data, so the same code evaluates many perturbed parameter sets at once.
"""
import torch
import torch.nn.functional as F
from torch import nn

IMAGE, PATCH, CLASSES = 8, 2, 10
TOKENS = (IMAGE // PATCH) ** 2


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        *lead, t, d = x.shape
        qkv = self.qkv(x).reshape(*lead, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each [..., h, t, dh]
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(-3, -2).reshape(*lead, t, d))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """[N, 64] pixels in [0, 1] -> [N, 10] logits; 2x2 patches, mean-pooled tokens."""

    def __init__(self, dim=32, depth=2, heads=4, hidden=64):
        super().__init__()
        self.embed = nn.Linear(PATCH * PATCH, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(TOKENS, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def features(self, x):
        """Pooled, normalised features before the head (the allocator's embedding)."""
        g = IMAGE // PATCH
        p = x.reshape(*x.shape[:-1], g, PATCH, g, PATCH).transpose(-3, -2)
        x = self.embed(p.reshape(*x.shape[:-1], TOKENS, PATCH * PATCH)) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x.mean(dim=-2))

    def forward(self, x):
        return self.head(self.features(x))


def build_model() -> TinyViT:
    # Seeded without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyViT()


def per_example_cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")
