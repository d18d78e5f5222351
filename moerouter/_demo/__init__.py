"""``python -m moerouter demo``: train a tiny MoE language model per routing policy and compare.

A byte-level causal transformer (2 layers, d = 128) whose feed-forward layers are
``moerouter_torch.MoE`` learns the running Python's own standard-library sources. It is trained
once per routing policy (top-1 and top-2 of 8 experts; AdaMoE with 8 real experts plus 8 or 16
null experts at k' = 4 and the pooled null-aware balancing loss), with the same initial seed and
the same batches. The demo writes a table, a JSON of every figure and a plot of validation loss
against real experts per token: AdaMoE's claim is that its points lie below the straight line
through top-1 and top-2.

Expert choice is left out: an expert picks its tokens across the whole sequence, so a token's
route depends on later tokens, which a causal language model must not see.

torch and ``moerouter_torch`` are imported only when the demo runs (``import moerouter`` imports
no framework); matplotlib is optional (without it the plot is skipped, everything else is written).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import moerouter as mr

__all__ = ["POLICIES", "add_arguments", "check", "run"]

#: name -> (label, router factory). Top-1 keeps the raw probability as its weight (Switch): with
#: renormalisation a lone choice would weigh exactly 1 and the gate would get no task gradient.
POLICIES: dict[str, tuple[str, Callable[[], Any]]] = {
    "top1": ("top-1 of 8", lambda: mr.TopK(num_experts=8, k=1, normalize=False)),
    "top2": ("top-2 of 8", lambda: mr.TopK(num_experts=8, k=2)),
    "adamoe-8": ("AdaMoE 8 + 8 null, k'=4", lambda: mr.NullExperts(8, num_null=8, k=4)),
    "adamoe-16": ("AdaMoE 8 + 16 null, k'=4", lambda: mr.NullExperts(8, num_null=16, k=4)),
}

NOT_CAUSAL_NOTE = (
    "expert choice is left out: each expert picks tokens across the whole sequence, so a token's "
    "route would depend on later tokens (not causal)"
)

# Model and optimiser: chosen so the four default runs take about four minutes on 2 CPU cores.
LAYERS = 2
HEADS = 4
EXPERT_WIDTH = 128  # SwiGLU hidden width of each routed expert
LEARNING_RATE = 3e-3
WARMUP_STEPS = 30
BALANCE_WEIGHT = 0.01  # per layer, on load_balancing / null_load_balancing (pooled)
Z_WEIGHT = 1e-3  # per layer, on the router z-loss
CORPUS_BYTES = 4_000_000


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _policy_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {','.join(POLICIES)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a policy is named twice in {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    parser.add_argument("--steps", type=_positive, default=500, help="training steps per policy")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="output folder (created)"
    )
    parser.add_argument(
        "--policies",
        type=_policy_names,
        default=tuple(POLICIES),
        help=f"comma-separated, from {','.join(POLICIES)} (default: all)",
    )
    parser.add_argument("--batch-size", type=_positive, default=16, help="sequences per step")
    parser.add_argument("--context", type=_positive, default=128, help="bytes per sequence")
    parser.add_argument("--dim", type=_positive, default=128, help="model width d")
    parser.add_argument(
        "--eval-batches", type=_positive, default=16, help="validation batches (fixed windows)"
    )
    parser.add_argument(
        "--threads", type=_positive, default=None, help="torch CPU threads (default: cores, <= 8)"
    )


class DemoInputError(ValueError):
    """Bad demo input, found before any training; the message starts with the option's name."""


def check(args: argparse.Namespace) -> str:
    """Validate what argparse cannot (torch present, device, output folder); return the device.

    Raises
    ------
    DemoInputError
        Naming the option at fault, before anything is trained.
    """
    if args.dim % HEADS:
        raise DemoInputError(
            f"--dim must be a multiple of {HEADS} (the attention heads), got {args.dim}"
        )
    requirements = (
        ("torch", "pip install torch"),
        ("moerouter_torch", "pip install -e backends/torch"),
    )
    for module, hint in requirements:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise DemoInputError(
                f"the demo needs {module}, which failed to import ({error}); {hint} "
                "(or run it with `nox -s demo`)"
            ) from None
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise DemoInputError(f"--device {device!r} is not usable here: {error}") from None
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise DemoInputError(f"--out {str(out)!r} is not a writable folder: {error}") from None
    return device


def run(args: argparse.Namespace, device: str) -> int:
    """Train every chosen policy; print the table; write results.json, results.txt, demo.png."""
    import torch

    threads = args.threads or min(os.cpu_count() or 1, 8)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # results can depend on it: it is recorded in the JSON
    try:
        return _train_and_report(args, device, threads)
    finally:
        torch.set_num_threads(threads_before)


def _train_and_report(args: argparse.Namespace, device: str, threads: int) -> int:
    import torch

    from moerouter._demo import report
    from moerouter._demo.data import load_corpus
    from moerouter._demo.train import Settings, train_policy

    settings = Settings(
        steps=args.steps,
        seed=args.seed,
        device=device,
        batch_size=args.batch_size,
        context=args.context,
        dim=args.dim,
        layers=LAYERS,
        heads=HEADS,
        expert_width=EXPERT_WIDTH,
        learning_rate=LEARNING_RATE,
        warmup_steps=WARMUP_STEPS,
        balance_weight=BALANCE_WEIGHT,
        z_weight=Z_WEIGHT,
        eval_batches=args.eval_batches,
    )
    corpus = load_corpus(CORPUS_BYTES)
    tokens_per_step = args.batch_size * args.context
    print(
        f"moerouter demo: a {LAYERS}-layer byte-level transformer (d={args.dim}, MoE feed-forward "
        f"layers of 8 experts) learns {corpus.files} standard-library files "
        f"({corpus.train.numel() / 1e6:.1f} MB train, {corpus.validation.numel() / 1e6:.2f} MB "
        f"validation).\n{args.steps} steps x {tokens_per_step} bytes per policy, seed {args.seed}, "
        f"device {device}, {threads} CPU thread{'s' if threads > 1 else ''}.\n"
        f"Note: {NOT_CAUSAL_NOTE}.\n",
        flush=True,
    )
    runs: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in args.policies:
        label, make_router = POLICIES[name]
        progress = report.ProgressBar(label, args.steps, tokens_per_step)
        figures = train_policy(make_router(), corpus, settings, progress.update)
        runs[name] = {
            "label": label,
            "router": repr(make_router()),
            **figures,
            "expert_flops_vs_top2": figures["real_experts_per_token"] / 2.0,
        }
    for run in runs.values():
        run["line_loss"] = report.line_between(runs, run["real_experts_per_token"])
    table = report.table(runs)
    print("\n" + table)

    out: Path = args.out
    title = (
        f"moerouter demo: {args.steps} steps x {tokens_per_step} bytes, seed {args.seed} "
        f"(validation: {args.eval_batches * tokens_per_step} bytes)"
    )
    plotted = report.plot(out / "demo.png", runs, title)
    document = {
        "command": shlex.join(["python", "-m", "moerouter", *getattr(args, "argv", ["demo"])]),
        "settings": {**asdict(settings), "threads": threads, "policies": list(args.policies)},
        "corpus": {
            "source": "top-level *.py files of this Python's standard library, in name order",
            "files": corpus.files,
            "train_bytes": corpus.train.numel(),
            "validation_bytes": corpus.validation.numel(),
        },
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__},
        "note": NOT_CAUSAL_NOTE,
        "timing_fields": list(report.TIMING_FIELDS),
        "runs": runs,
    }
    report.write_json(out / "results.json", document)
    (out / "results.txt").write_text(title + "\n\n" + table + "\n", encoding="utf-8")
    print(
        f"\nvs top-1/top-2 line: validation loss minus the straight line through the top-1 and "
        f"top-2 points at the same real experts per token (negative: below the line, better).\n"
        f"Wrote {out / 'results.txt'}, {out / 'results.json'}"
        + (f" and {out / 'demo.png'}" if plotted else "; plot skipped: matplotlib is not installed")
        + f" ({time.perf_counter() - started:.0f} s)."
    )
    return 0
