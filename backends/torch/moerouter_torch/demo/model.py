"""A small causal byte-level transformer whose feed-forward layers are ``moerouter_torch.MoE``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moerouter_torch import MoE

__all__ = ["TinyMoELM"]

VOCABULARY = 256  # bytes


class Block(nn.Module):
    """Pre-norm causal self-attention, then a routed MoE feed-forward layer."""

    def __init__(
        self, dim: int, heads: int, expert_width: int, router: Any, activation: str
    ) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attention_out = nn.Linear(dim, dim, bias=False)
        self.moe_norm = nn.LayerNorm(dim)
        self.moe = MoE(dim, expert_width, router, activation=activation)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, length, dim = x.shape
        qkv = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
        x = x + self.attention_out(attended.transpose(1, 2).reshape(batch, length, dim))
        routed, losses = self.moe(self.moe_norm(x))
        take_losses = getattr(self.moe.router, "take_losses", None)  # an AdaptiveRouter's own
        if take_losses is not None:
            losses = {**losses, **take_losses()}
        return x + routed, losses


class TinyMoELM(nn.Module):
    """Byte embedding + learned positions, ``layers`` blocks, tied output head.

    ``forward(bytes (B, S) int64) -> (logits (B, S, 256), [per-layer MoE losses])``.
    """

    def __init__(
        self,
        router: Any,
        *,
        dim: int,
        layers: int,
        heads: int,
        expert_width: int,
        activation: str,
        context: int,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, dim)
        self.positions = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, expert_width, router, activation) for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)

    def moe_layers(self) -> list[MoE]:
        """The routed layers, first to last."""
        return [block.moe for block in self.blocks]  # type: ignore[union-attr]

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        x = self.embedding(tokens) + self.positions[: tokens.shape[1]]
        layer_losses = []
        for block in self.blocks:
            x, losses = block(x)
            layer_losses.append(losses)
        logits = self.final_norm(x) @ self.embedding.weight.T
        return logits, layer_losses
