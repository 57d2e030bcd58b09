"""A compact class-conditional diffusion transformer (DiT, Peebles & Xie 2023, arXiv:2212.09748).

DiT's design at a small scale: patch tokens with fixed 2-D sin-cos positions, adaLN-Zero blocks
conditioned on (timestep + class) embeddings, a zero-initialised linear decoder to the noise
prediction. The linear layers carry the usual names (``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2``, ``adaLN_modulation``), so adapters target them as in a full-size DiT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim)."""
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for pos in (yy.flatten(), xx.flatten()):
        out = pos[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: conditioning regresses shift, scale and a zero-initialised gate per branch."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class CompactDiT(nn.Module):
    """``eps = DiT(x_t, t, y)``; label ``num_classes`` is the null label of classifier-free guidance."""

    def __init__(self, input_size: int = 16, patch_size: int = 2, in_channels: int = 1, hidden_size: int = 128,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} must be a multiple of patch_size={patch_size}")
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 and of num_heads={num_heads}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes)
        self.patch_size, self.in_channels, self.num_classes = patch_size, in_channels, num_classes
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, self.grid).unsqueeze(0), persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        b = x.shape[0]
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(timestep_embedding(t, 256).to(h.dtype)) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        h = self.final_linear(modulate(self.final_norm(h), shift, scale))
        p, g = self.patch_size, self.grid
        h = h.view(b, g, g, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.in_channels, g * p, g * p)
