"""Denoising adapter: maps LLM hidden states H toward the LLM's text-embedding space.

Paper §2.4: an FFN placed before the echo decoder, trained with a cosine loss against
Emb(X′) so that the echo decoder sees inputs close to what the T2C saw during Stage II.
"""

from __future__ import annotations

import torch
from torch import nn


class DenoisingAdapter(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1, trainable: bool = True) -> None:
        super().__init__()
        self.trainable = trainable
        self.net = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.requires_grad_(trainable)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # [..., D] -> [..., D]
        return self.net(hidden.to(self.net[0].weight.dtype))
