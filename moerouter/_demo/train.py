"""Train one routing policy's model and measure it: validation loss, routing, throughput."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import moerouter as mr
from moerouter._demo.data import Corpus
from moerouter._demo.model import TinyMoELM

__all__ = ["Settings", "train_policy"]


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides its router (identical across the compared policies)."""

    steps: int
    seed: int
    device: str
    batch_size: int
    context: int
    dim: int
    layers: int
    heads: int
    expert_width: int
    learning_rate: float
    warmup_steps: int
    balance_weight: float
    z_weight: float
    eval_batches: int


def _learning_rate_factor(step: int, settings: Settings) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    warmup = min(settings.warmup_steps, max(settings.steps // 10, 1))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(settings.steps - warmup, 1)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_policy(
    router: Any,
    corpus: Corpus,
    settings: Settings,
    on_step: Callable[[int, float], None],
) -> dict[str, Any]:
    """Train a fresh model routed by ``router``; return its figures (see ``report.FIELDS``)."""
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    model = TinyMoELM(
        router,
        dim=settings.dim,
        layers=settings.layers,
        heads=settings.heads,
        expert_width=settings.expert_width,
        context=settings.context,
    ).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, settings)
    )
    batches = corpus.train_batches(settings.batch_size, settings.context, settings.seed)
    train_losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in range(settings.steps):
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        logits, layer_losses = model(inputs)
        task = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        balance = torch.stack([losses["load_balancing"] for losses in layer_losses]).sum()
        z_loss = torch.stack([losses["z_loss"] for losses in layer_losses]).sum()
        loss = task + settings.balance_weight * balance + settings.z_weight * z_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        train_losses.append(float(task.detach()))  # a device sync too: the timing stays honest
        on_step(step + 1, train_losses[-1])
    train_seconds = time.perf_counter() - started
    figures: dict[str, Any] = evaluate(model, corpus, settings)
    tokens = settings.steps * settings.batch_size * settings.context
    figures.update(
        train_loss_curve=[round(value, 4) for value in train_losses],
        train_tokens=tokens,
        train_seconds=train_seconds,
        tokens_per_second=tokens / train_seconds,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
    )
    return figures


def evaluate(model: TinyMoELM, corpus: Corpus, settings: Settings) -> dict[str, Any]:
    """Validation loss (nats/byte) and each MoE layer's routing, over the validation windows."""
    with torch.no_grad():
        return _evaluate(model, corpus, settings)


def _evaluate(model: TinyMoELM, corpus: Corpus, settings: Settings) -> dict[str, Any]:
    device = torch.device(settings.device)
    layers = model.moe_layers()
    gate_logits: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.gate.register_forward_hook(
            lambda _module, _inputs, output, captured=captured: captured.append(output)
        )
        for layer, captured in zip(layers, gate_logits, strict=True)
    ]
    model.eval()
    total_loss = 0.0
    total_tokens = 0
    try:
        for inputs, targets in corpus.validation_batches(
            settings.batch_size, settings.context, settings.eval_batches
        ):
            logits, _ = model(inputs.to(device))
            total_loss += float(
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum"
                )
            )
            total_tokens += targets.numel()
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = [
        _routing_figures(layer.router, captured)
        for layer, captured in zip(layers, gate_logits, strict=True)
    ]
    return {
        "validation_loss": total_loss / total_tokens,
        "real_experts_per_token": sum(layer["real_experts_per_token"] for layer in per_layer)
        / len(per_layer),
        "layers": per_layer,
    }


def _routing_figures(router: Any, gate_logits: list[torch.Tensor]) -> dict[str, Any]:
    """Re-run the (deterministic) router on the captured gate logits; sum counts over batches."""
    routing = router(torch.cat(gate_logits))
    summary = mr.stats.summary(routing)
    tokens = routing.num_tokens
    tokens_per_expert = summary["tokens_per_expert"].cpu()
    return {
        "real_experts_per_token": float(summary["real_experts_per_token"]),
        "expert_load": [float(count) / tokens for count in tokens_per_expert.tolist()],
        "real_experts_histogram": [int(n) for n in summary["real_experts_histogram"].tolist()],
        "null_fraction": float(summary["null_fraction"]),
        "load_cv": float(summary["load_cv"]),
        "tokens": tokens,
    }
