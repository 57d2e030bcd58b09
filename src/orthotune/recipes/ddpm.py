"""DDPM (Ho et al. 2020): the forward noising process, the noise-prediction loss and DDIM sampling, as DiT uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DDPM:
    """The forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and DDIM sampling."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.steps = steps
        self.abar = torch.cumprod(1.0 - betas, 0).float()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self.abar.to(x0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor, generator: torch.Generator, label_dropout: float = 0.0,
             null_label: int = 0) -> Tensor:
        """Noise-prediction MSE at random timesteps; randomness from ``generator`` (CPU) only."""
        b = x0.shape[0]
        t = torch.randint(0, self.steps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        if label_dropout > 0:
            drop = (torch.rand(b, generator=generator) < label_dropout).to(x0.device)
            y = torch.where(drop, torch.full_like(y, null_label), y)
        return F.mse_loss(model(self.add_noise(x0, noise, t), t, y).float(), noise)

    @torch.no_grad()
    def sample(self, model: nn.Module, y: Tensor, shape: tuple[int, ...], generator: torch.Generator, steps: int = 50,
               guidance: float = 2.0, null_label: int = 0) -> Tensor:
        """Deterministic DDIM (eta = 0) with classifier-free guidance; returns x_0 in [-1, 1]."""
        device = y.device
        x = torch.randn(shape, generator=generator).to(device)
        ts = torch.linspace(self.steps - 1, 0, steps).round().long().tolist()
        abar = self.abar.to(device)
        null = torch.full_like(y, null_label)
        for i, t in enumerate(ts):
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            eps_c, eps_u = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            a = abar[t]
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            a_next = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return x.clamp(-1, 1)
