"""``python -m moerouter demo``: convert a trained top-2 MoE to AdaMoE as the paper does; measure.

A byte-level causal transformer (2 layers, d = 128) whose feed-forward layers are
``moerouter_torch.MoE`` (8 GELU experts) is pretrained with top-2 routing on the running Python's
standard-library sources (cached in the output folder: a second run skips it). From that
checkpoint every run fine-tunes the same number of steps on the same batches: top-2 continued,
top-1, and AdaMoE with 8 or 16 null experts at k' = 4, converted with tiled null rows so that it
starts from exactly the pretrained model. Validation over fixed windows gives each run's loss
with its standard error and its paired difference to top-2; the table, the plot and a closing
verdict say what AdaMoE saves and what it pays. ``--from-scratch`` trains every policy from
scratch instead.

``--peers`` adds AdaMoE's adaptive-compute peers, converted from the same checkpoint: top-p and
ReLU routing set to about 1.5 real experts per token, and causal expert choice (capacity factor
1.5) evaluated with its running thresholds or with its predictor, whose agreement with batch
expert choice and realised capacity per expert are reported too
(:mod:`moerouter_torch.demo.adaptive`). Batch expert choice itself is left out: an expert picks
its tokens across the whole sequence, so a token's route depends on later tokens, which a causal
language model must not see. Other policies are one entry each in
:data:`moerouter_torch.demo.runs.RUNS`. matplotlib is optional (without it the plot is skipped,
everything else is written).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moerouter_torch.demo.runs import BASELINE, PEERS, RUNS

__all__ = ["DemoInputError", "add_arguments", "check", "run"]

NOT_CAUSAL_NOTE = (
    "batch expert choice is left out: each expert picks tokens across the whole sequence, so a "
    "token's route would depend on later tokens (not causal); causal expert choice trains with it "
    "but is evaluated with its causal rule (running thresholds or a predictor)"
)

# Fixed parts of the set-up (the options change the rest).
LAYERS = 2
HEADS = 4
ACTIVATION = "gelu"
WARMUP_FRACTION = 0.1
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("(none given)")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is named twice in {text!r}")
    return seeds


def _run_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in RUNS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {','.join(RUNS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a policy is named twice in {text!r}")
    if BASELINE not in names:
        raise argparse.ArgumentTypeError(
            f"must include {BASELINE!r}: every difference is taken against it"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    add = parser.add_argument
    add("--seeds", type=_seeds, default=(0,), help="comma-separated; results average over them")
    add("--pretrain-steps", type=_positive, default=150, help="top-2 pretraining steps")
    add("--pretrain-lr", type=_positive_float, default=3e-3, help="pretraining learning rate")
    add("--steps", type=_positive, default=50, help="fine-tuning steps per policy")
    add("--lr", type=_positive_float, default=1e-3, help="fine-tuning learning rate")
    add(
        "--from-scratch",
        action="store_true",
        help="train every policy from scratch for pretrain-steps + steps at the pretraining lr",
    )
    add(
        "--policies",
        type=_run_names,
        default=tuple(name for name in RUNS if name not in PEERS),
        help=f"comma-separated, from {','.join(RUNS)} (default: all but the peers; {BASELINE} "
        "is required)",
    )
    add(
        "--peers",
        action="store_true",
        help=f"also run AdaMoE's adaptive-compute peers ({','.join(PEERS)}); about 1.7 times "
        "the default run's time",
    )
    add("--batch-size", type=_positive, default=16, help="sequences per step")
    add("--context", type=_positive, default=128, help="bytes per sequence")
    add("--dim", type=_positive, default=128, help="model width d")
    add("--expert-width", type=_positive, default=256, help="hidden width of each expert")
    add("--windows", type=_positive, default=64, help="validation windows (fixed)")
    add("--window-bytes", type=_positive, default=4096, help="bytes per validation window")
    add("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add("--threads", type=_positive, default=None, help="torch CPU threads (default: cores, <= 8)")
    add("--out", type=Path, default=Path("demo-output"), help="output folder (created)")


class DemoInputError(ValueError):
    """Bad demo input, found before any training; the message starts with the option's name."""


def check(args: argparse.Namespace) -> str:
    """Validate what argparse cannot (device, shapes, output folder); return the device.

    Raises
    ------
    DemoInputError
        Naming the option at fault, before anything is trained.
    """
    import torch

    if args.dim % HEADS:
        raise DemoInputError(
            f"--dim must be a multiple of {HEADS} (the attention heads), got {args.dim}"
        )
    if args.window_bytes % args.context:
        raise DemoInputError(
            f"--window-bytes must be a multiple of --context ({args.context}), "
            f"got {args.window_bytes}"
        )
    if args.windows < 2:
        raise DemoInputError(f"--windows must be >= 2 for a standard error, got {args.windows}")
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
    """Train and compare every chosen run; print the table; write results.json/.txt, demo.png."""
    import torch

    if getattr(args, "peers", False):  # --peers: the chosen runs, then every peer not named
        args.policies = (*args.policies, *(name for name in PEERS if name not in args.policies))

    from moerouter_torch.demo.data import load_corpus

    threads = args.threads or min(os.cpu_count() or 1, 8)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # results can depend on it: it is in the settings
    try:
        corpus = load_corpus(CORPUS_BYTES)
        try:
            corpus.validation_windows(args.windows, args.window_bytes, args.context)
        except ValueError as error:
            print(f"python -m moerouter demo: error: --windows: {error}", file=sys.stderr)
            return 2
        return _train_and_report(args, device, threads, corpus)
    finally:
        torch.set_num_threads(threads_before)


def _settings(args: argparse.Namespace, seed: int, device: str, threads: int) -> Any:
    from moerouter_torch.demo.train import Settings

    return Settings(
        seed=seed,
        device=device,
        threads=threads,
        batch_size=args.batch_size,
        context=args.context,
        dim=args.dim,
        layers=LAYERS,
        heads=HEADS,
        expert_width=args.expert_width,
        activation=ACTIVATION,
        pretrain_steps=args.pretrain_steps,
        pretrain_learning_rate=args.pretrain_lr,
        steps=args.steps,
        learning_rate=args.lr,
        warmup_fraction=WARMUP_FRACTION,
        balance_weight=BALANCE_WEIGHT,
        z_weight=Z_WEIGHT,
        windows=args.windows,
        window_bytes=args.window_bytes,
        corpus_bytes=CORPUS_BYTES,
    )


def _one_seed(
    args: argparse.Namespace, settings: Any, corpus: Any
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every chosen run at one seed: its figures, and what happened to the pretraining."""
    from moerouter_torch.demo import report
    from moerouter_torch.demo.train import evaluate, load_or_pretrain, make_model, train

    tokens_per_step = settings.batch_size * settings.context
    figures: dict[str, dict[str, Any]] = {}
    pretraining: dict[str, Any] = {}
    state = None
    if not args.from_scratch:
        bar = report.ProgressBar(
            f"pretrain top-2, seed {settings.seed}", settings.pretrain_steps, tokens_per_step
        )
        state, pretrain_figures, cached = load_or_pretrain(
            RUNS[BASELINE].scratch(), corpus, settings, args.out, bar.update
        )
        if cached:
            print(f"pretraining skipped: seed {settings.seed}'s checkpoint is cached in {args.out}")
        pretraining = {"cached": cached, **pretrain_figures}
    for name in args.policies:
        spec = RUNS[name]
        batches = corpus.train_batches(settings.batch_size, settings.context, settings.seed)
        if args.from_scratch:
            router = spec.scratch()
            model = make_model(router, settings)
            if spec.scratch_layer is not None:
                for layer in model.moe_layers():
                    spec.scratch_layer(layer)
                router = model.moe_layers()[0].router
            steps, learning_rate = (
                settings.pretrain_steps + settings.steps,
                settings.pretrain_learning_rate,
            )
        else:
            router = RUNS[BASELINE].scratch()
            model = make_model(router, settings)
            model.load_state_dict(state)
            for layer in model.moe_layers():
                spec.fine_tune(layer)
            router = model.moe_layers()[0].router
            for _ in range(settings.pretrain_steps):  # fine-tuning continues the batch stream
                next(batches)
            steps, learning_rate = settings.steps, settings.learning_rate
        bar = report.ProgressBar(f"{spec.label}, seed {settings.seed}", steps, tokens_per_step)
        trained = train(
            model, batches, settings, steps=steps, learning_rate=learning_rate, on_step=bar.update
        )
        figures[name] = {
            "router": repr(router),
            **evaluate(model, corpus, settings),
            **trained,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
        }
    return figures, pretraining


def _aggregate(
    per_seed: dict[int, dict[str, dict[str, Any]]], names: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Per run: window losses averaged over seeds, then means, SEs and paired differences."""
    from moerouter_torch.demo import statistics

    def seed_mean(name: str, field: str) -> float:
        return sum(figures[name][field] for figures in per_seed.values()) / len(per_seed)

    windows = {
        name: statistics.seed_average(
            {seed: figures[name]["window_losses"] for seed, figures in per_seed.items()}
        )
        for name in names
    }
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        experts = seed_mean(name, "real_experts_per_token")
        loss = statistics.estimate(windows[name])
        run: dict[str, Any] = {
            "label": RUNS[name].label,
            "router": per_seed[next(iter(per_seed))][name]["router"],
            "validation_loss": loss.mean,
            "validation_loss_se": loss.se,
            "difference_vs_top2": statistics.difference(windows[name], windows[BASELINE]),
            "real_experts_per_token": experts,
            "expert_flops_vs_top2": experts / 2.0,
            "defines_line": name in ("top1", "top2"),
            "vs_line": None,
            "tokens_per_second": seed_mean(name, "tokens_per_second"),
            "per_seed": {},
        }
        if "top1" in windows and not run["defines_line"]:
            run["vs_line"] = statistics.versus_line(
                windows[name], windows["top1"], windows[BASELINE], experts
            )
        for seed, figures in per_seed.items():
            mine = figures[name]
            seed_loss = statistics.estimate(mine["window_losses"])
            run["per_seed"][str(seed)] = {
                "validation_loss": seed_loss.mean,
                "validation_loss_se": seed_loss.se,
                "difference_vs_top2": statistics.difference(
                    mine["window_losses"], figures[BASELINE]["window_losses"]
                ),
                **{key: value for key, value in mine.items() if key != "router"},
            }
        # per-layer loads and realised-k histograms: summed (histograms) or averaged over seeds
        layers = [figures[name]["layers"] for figures in per_seed.values()]
        run["layers"] = [
            {
                "real_experts_per_token": sum(seed[i]["real_experts_per_token"] for seed in layers)
                / len(layers),
                "expert_load": [
                    sum(seed[i]["expert_load"][e] for seed in layers) / len(layers)
                    for e in range(len(layers[0][i]["expert_load"]))
                ],
                "real_experts_histogram": [
                    sum(seed[i]["real_experts_histogram"][n] for seed in layers)
                    for n in range(len(layers[0][i]["real_experts_histogram"]))
                ],
                "null_fraction": sum(seed[i]["null_fraction"] for seed in layers) / len(layers),
                "tokens": sum(seed[i]["tokens"] for seed in layers),
                **{  # an adaptive router's own figures (causal agreement, L1 coefficient...)
                    field: _seed_mean([seed[i][field] for seed in layers])
                    for field in ADAPTIVE_FIELDS
                    if field in layers[0][i]
                },
            }
            for i in range(len(layers[0]))
        ]
        if "agreement" in run["layers"][0]:
            run["causal"] = {
                field: sum(layer[field] for layer in run["layers"]) / len(run["layers"])
                for field in ("agreement", "recall", "precision")
            }
            run["causal"]["capacity"] = run["layers"][0]["capacity"]
            run["causal"]["realised_capacity_vs_c"] = [
                layer["realised_capacity_vs_c"] for layer in run["layers"]
            ]
        runs[name] = run
    return runs


# Per-layer figures of an adaptive router (moerouter_torch.demo.adaptive), averaged over seeds.
ADAPTIVE_FIELDS = (
    "agreement",
    "recall",
    "precision",
    "capacity",
    "realised_capacity",
    "realised_capacity_vs_c",
    "compared_tokens",
    "l1_coefficient",
    "cut_fraction",
)


def _seed_mean(values: list[Any]) -> Any:
    """The mean over seeds of a number, or of lists of numbers elementwise (a value every seed
    shares, such as the capacity C, is kept as it is)."""
    if all(value == values[0] for value in values):
        return values[0]
    if isinstance(values[0], list):
        return [sum(column) / len(values) for column in zip(*values, strict=True)]
    return sum(values) / len(values)


def _train_and_report(args: argparse.Namespace, device: str, threads: int, corpus: Any) -> int:
    import torch

    from moerouter_torch.demo import report

    started = time.perf_counter()
    seeds: tuple[int, ...] = args.seeds
    first = _settings(args, seeds[0], device, threads)
    mode = (
        f"every policy trained from scratch for {args.pretrain_steps + args.steps} steps"
        if args.from_scratch
        else f"top-2 pretrained {args.pretrain_steps} steps, then each policy fine-tuned "
        f"{args.steps} steps on the same batches"
    )
    print(
        f"moerouter demo: a {LAYERS}-layer byte-level transformer (d={args.dim}, MoE feed-forward "
        f"layers of 8 {ACTIVATION.upper()} experts of width {args.expert_width}) learns "
        f"{corpus.files} standard-library files ({corpus.train.numel() / 1e6:.1f} MB train).\n"
        f"{mode}; batches of {args.batch_size} x {args.context} bytes; seeds "
        f"{','.join(map(str, seeds))}; device {device}, {threads} CPU thread"
        f"{'s' if threads > 1 else ''}.\nValidation: {args.windows} fixed windows of "
        f"{args.window_bytes} bytes ({args.windows * args.window_bytes / 1024:.0f} KB); "
        f"differences are paired over them.\nNote: {NOT_CAUSAL_NOTE}.\n",
        flush=True,
    )
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    pretraining: dict[str, Any] = {}
    for seed in seeds:
        settings = _settings(args, seed, device, threads)
        per_seed[seed], pretraining[str(seed)] = _one_seed(args, settings, corpus)
    runs = _aggregate(per_seed, args.policies)
    table = report.table(runs, BASELINE)
    causal = report.causal_lines(runs)
    if causal:
        table += "\n\n" + causal
    verdict = "Verdict: " + report.verdict(runs, BASELINE)
    print("\n" + table + "\n\n" + verdict)

    out: Path = args.out
    seeds_text = ",".join(map(str, seeds))
    title = (
        f"moerouter demo ({'from scratch' if args.from_scratch else 'fine-tuned from top-2'}): "
        f"seeds {seeds_text}, validation {args.windows} x {args.window_bytes} bytes"
    )
    plotted = report.plot(out / "demo.png", runs, title)
    wall = time.perf_counter() - started
    settings_record = {key: value for key, value in asdict(first).items() if key != "seed"}
    document = {
        "command": shlex.join(["python", "-m", "moerouter", *getattr(args, "argv", ["demo"])]),
        "mode": "from-scratch" if args.from_scratch else "fine-tune",
        "settings": {**settings_record, "policies": list(args.policies)},
        "seeds": list(seeds),
        "wall_seconds": wall,
        "corpus": {
            "source": "top-level *.py files of this Python's standard library, in name order",
            "files": corpus.files,
            "train_bytes": corpus.train.numel(),
            "validation_bytes": corpus.validation.numel(),
        },
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__},
        "note": NOT_CAUSAL_NOTE,
        "statistics": (
            "window losses averaged over seeds; SE over windows; differences paired by window"
        ),
        "timing_fields": ["train_seconds", "tokens_per_second", "wall_seconds"],
        "pretraining": pretraining,
        "verdict": verdict,
        "runs": runs,
    }
    report.write_json(out / "results.json", document)
    text = f"{title}\n\n{table}\n\n{verdict}\n"
    (out / "results.txt").write_text(text, encoding="utf-8")
    print(
        "\nvs top-2 (paired): loss minus top-2's on the same windows. vs top-1/top-2 line: loss"
        " minus the straight line through top-1 and top-2 at the same real experts per token"
        " (negative: below the line, better; * extrapolated). ± one standard error over the"
        " windows.\n"
        f"Wrote {out / 'results.txt'}, {out / 'results.json'}"
        + (f" and {out / 'demo.png'}" if plotted else "; plot skipped: matplotlib is not installed")
        + f" ({wall:.0f} s)."
    )
    return 0
