"""Modality projector: pixel shuffle (nanoVLM's channel ordering) then one linear layer."""

from __future__ import annotations

import torch
import torch.nn as nn

from core.config import VLMConfig


class ModalityProjector(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        self.grid = cfg.vit_grid
        self.proj = nn.Linear(cfg.vit_hidden_dim * self.scale_factor**2, cfg.lm_hidden_dim, bias=False)
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.02)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, grid*grid, D] -> [N, (grid/f)^2, D*f*f]; the grid side comes from the config, not
        # from sqrt(seq), so the traced graph has no data-dependent arithmetic.
        n, _, d = x.shape
        f, g = self.scale_factor, self.grid
        x = x.reshape(n, g // f, f, g // f, f, d)
        x = x.permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (g // f) ** 2, d * f * f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pixel_shuffle(x))
