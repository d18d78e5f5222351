"""Train and measure: pretraining (cached), fine-tuning, validation per window, routing figures."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import moerouter as mr
from moerouter_torch.demo.adaptive import PREDICTOR_LR_SCALE, AdaptiveRouter
from moerouter_torch.demo.data import Corpus
from moerouter_torch.demo.model import TinyMoELM
from moerouter_torch.nn import MoE

__all__ = ["Settings", "evaluate", "load_or_pretrain", "make_model", "train"]

OnStep = Callable[[int, float], None]


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides its policy (identical across the compared runs)."""

    seed: int
    device: str
    threads: int
    batch_size: int
    context: int
    dim: int
    layers: int
    heads: int
    expert_width: int
    activation: str
    pretrain_steps: int
    pretrain_learning_rate: float
    steps: int  # fine-tuning steps (from scratch: training steps)
    learning_rate: float  # of fine-tuning (from scratch: of training)
    warmup_fraction: float
    balance_weight: float
    z_weight: float
    windows: int
    window_bytes: int
    corpus_bytes: int


def make_model(router: Any, settings: Settings) -> TinyMoELM:
    """A fresh model routed by ``router``, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(settings.seed)
    model = TinyMoELM(
        router,
        dim=settings.dim,
        layers=settings.layers,
        heads=settings.heads,
        expert_width=settings.expert_width,
        activation=settings.activation,
        context=settings.context,
    )
    return model.to(torch.device(settings.device))


def _learning_rate_factor(step: int, steps: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    warmup = max(round(warmup_fraction * steps), 1)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train(
    model: TinyMoELM,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    settings: Settings,
    *,
    steps: int,
    learning_rate: float,
    on_step: OnStep,
) -> dict[str, Any]:
    """``steps`` AdamW steps from a fresh optimizer; returns the loss curve and the timing."""
    device = torch.device(settings.device)
    # A causal expert-choice predictor is a fresh classifier: it learns faster than the model.
    named = list(model.named_parameters())
    groups = [
        {"params": [p for name, p in named if ".predictor." not in name], "lr": learning_rate},
        {
            "params": [p for name, p in named if ".predictor." in name],
            "lr": learning_rate * PREDICTOR_LR_SCALE,
        },
    ]
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]], betas=(0.9, 0.95), weight_decay=0.1
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, steps, settings.warmup_fraction)
    )
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        inputs, targets = next(batches)
        logits, layer_losses = model(inputs.to(device))
        task = nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
        balance = torch.stack([losses["load_balancing"] for losses in layer_losses]).sum()
        z_loss = torch.stack([losses["z_loss"] for losses in layer_losses]).sum()
        loss = task + settings.balance_weight * balance + settings.z_weight * z_loss
        for own in layer_losses:  # already weighted: an AdaptiveRouter's own loss
            if "adaptive" in own:
                loss = loss + own["adaptive"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(task.detach()))  # a device sync too: the timing stays honest
        on_step(step + 1, losses[-1])
    seconds = time.perf_counter() - started
    tokens = steps * settings.batch_size * settings.context
    return {
        "train_loss_curve": [round(value, 4) for value in losses],
        "train_tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
    }


def evaluate(model: TinyMoELM, corpus: Corpus, settings: Settings) -> dict[str, Any]:
    """Each validation window's loss (nats/byte) and each MoE layer's routing over all windows."""
    inputs, targets = corpus.validation_windows(
        settings.windows, settings.window_bytes, settings.context
    )
    layers = model.moe_layers()
    logits_seen: list[list[torch.Tensor]] = [[] for _ in layers]
    extra_seen: list[list[torch.Tensor]] = [[] for _ in layers]  # e.g. a predictor's logits

    def capture(captured: list[torch.Tensor], extra: list[torch.Tensor]) -> Any:
        def hook(layer: MoE, args: tuple[torch.Tensor, ...]) -> None:
            tokens = args[0].reshape(-1, args[0].shape[-1])
            captured.append(layer.gate_logits(tokens))
            if isinstance(layer.router, AdaptiveRouter):
                more = layer.router.capture(tokens)
                if more is not None:
                    extra.append(more)

        return hook

    hooks = [
        layer.register_forward_pre_hook(capture(captured, extra))
        for layer, captured, extra in zip(layers, logits_seen, extra_seen, strict=True)
    ]
    device = torch.device(settings.device)
    window_losses: list[float] = []
    model.eval()
    try:
        with torch.no_grad():
            for window_inputs, window_targets in zip(inputs, targets, strict=True):
                logits, _ = model(window_inputs.to(device))
                loss = nn.functional.cross_entropy(
                    logits.flatten(0, 1), window_targets.to(device).flatten()
                )
                window_losses.append(float(loss))
            per_layer = [
                _routing_figures(layer.router, captured, extra)
                for layer, captured, extra in zip(layers, logits_seen, extra_seen, strict=True)
            ]
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "window_losses": window_losses,
        "real_experts_per_token": sum(layer["real_experts_per_token"] for layer in per_layer)
        / len(per_layer),
        "layers": per_layer,
    }


def _routing_figures(
    router: Any, gate_logits: list[torch.Tensor], extra: list[torch.Tensor]
) -> dict[str, Any]:
    """Re-run the (deterministic) router on the captured gate logits (an adaptive router also
    on what it captured itself), as it routed in evaluation."""
    logits = torch.cat(gate_logits)
    own: dict[str, Any] = {}
    if isinstance(router, AdaptiveRouter):
        routing = router.route(logits, torch.cat(extra) if extra else None)
        own = router.figures(logits, routing)
    else:
        routing = router(logits)
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
        **own,
    }


def pretrain_key(settings: Settings) -> dict[str, Any]:
    """What the pretrained checkpoint depends on (not the fine-tuning or validation settings)."""
    fields = asdict(settings)
    for name in ("steps", "learning_rate", "windows", "window_bytes"):
        del fields[name]
    return {**fields, "torch": torch.__version__}


def checkpoint_path(folder: Path, settings: Settings) -> Path:
    """``folder/pretrained-<hash of pretrain_key>.pt``."""
    text = json.dumps(pretrain_key(settings), sort_keys=True)
    return folder / f"pretrained-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"


def load_or_pretrain(
    router: Any,
    corpus: Corpus,
    settings: Settings,
    folder: Path,
    on_step: OnStep,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """The pretrained model's state dict and its training figures, from ``folder`` when a
    checkpoint with the same :func:`pretrain_key` is there (third item: True), else trained
    for ``settings.pretrain_steps`` steps and saved."""
    path = checkpoint_path(folder, settings)
    key = pretrain_key(settings)
    if path.exists():
        saved = torch.load(path, map_location=settings.device, weights_only=True)
        if saved.get("key") == json.dumps(key, sort_keys=True):
            return saved["state_dict"], json.loads(saved["figures"]), True
    model = make_model(router, settings)
    batches = corpus.train_batches(settings.batch_size, settings.context, settings.seed)
    figures = train(
        model,
        batches,
        settings,
        steps=settings.pretrain_steps,
        learning_rate=settings.pretrain_learning_rate,
        on_step=on_step,
    )
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "key": json.dumps(key, sort_keys=True),
            "figures": json.dumps(figures),
            "state_dict": state,
        },
        partial,
    )
    partial.replace(path)  # an interrupted save leaves no checkpoint that looks complete
    return state, figures, False
