"""``python -m moerouter demo`` (moerouter_torch.demo): end to end at a tiny size, the pretraining
cache, reproducibility, the statistics on a synthetic case, and every bad input.

The training tests need torch and the torch plugin and skip without them (the ``tests_core``
session); the missing-plugin message and the statistics run everywhere.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import subprocess
import sys

import pytest

from moerouter.__main__ import main

# A model small enough that every run trains and validates in a few seconds on 2 cores; one
# thread, because several threads on a busy machine spin and wait for each other.
TINY = ["--pretrain-steps", "3", "--steps", "2", "--batch-size", "2", "--context", "16"]
TINY += ["--dim", "16", "--expert-width", "16", "--windows", "4", "--window-bytes", "64"]
TINY += ["--threads", "1"]
TIMING = ("train_seconds", "tokens_per_second")


@pytest.fixture
def torch_plugin():
    pytest.importorskip("torch")
    pytest.importorskip("moerouter_torch.demo")


def _numbers(path):
    """Every figure of results.json except the machine-dependent timings."""
    runs = json.loads(path.read_text())["runs"]
    for run in runs.values():
        run.pop("tokens_per_second")
        for seed in run["per_seed"].values():
            for field in TIMING:
                seed.pop(field)
    return runs


@pytest.mark.usefixtures("torch_plugin")
def test_end_to_end_fine_tunes_from_one_cached_checkpoint(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401  (optional: the plot is written exactly when it is present)

        plotting = True
    except ImportError:
        plotting = False
    out = tmp_path / "nested" / "out"  # the folder is created, parents included
    assert main(["demo", *TINY, "--seeds", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert str(out / "results.json") in printed.out
    assert ("demo.png" in printed.out) is plotting
    assert "expert choice is left out" in printed.out  # the note on causality
    assert "Verdict: top-1 of 8 saves 50% of top-2's expert FLOPs" in printed.out
    assert "pretrain top-2, seed 1" in printed.err and "3/3" in printed.err
    assert "pretraining skipped" not in printed.out
    checkpoints = sorted(out.glob("pretrained-*.pt"))
    assert len(checkpoints) == 2  # one per seed

    document = json.loads((out / "results.json").read_text())
    assert document["command"].startswith("python -m moerouter demo --pretrain-steps 3")
    assert document["seeds"] == [0, 1] and document["mode"] == "fine-tune"
    assert document["settings"]["threads"] == 1 and document["wall_seconds"] > 0
    assert document["verdict"].startswith("Verdict: ")
    runs = document["runs"]
    assert list(runs) == ["top2", "top1", "adamoe-8", "adamoe-16"]
    assert runs["top1"]["real_experts_per_token"] == 1.0  # no capacity: nothing is dropped
    assert runs["top2"]["real_experts_per_token"] == 2.0
    assert runs["top2"]["difference_vs_top2"] == {"mean": 0.0, "se": 0.0}
    assert runs["adamoe-16"]["router"].startswith("NullExperts(num_experts=8, num_null=16, k=4")
    for run in runs.values():
        assert run["validation_loss_se"] > 0 and run["difference_vs_top2"]["se"] >= 0
        assert run["expert_flops_vs_top2"] == pytest.approx(run["real_experts_per_token"] / 2)
        assert set(run["per_seed"]) == {"0", "1"}
        seeds = run["per_seed"].values()
        assert run["validation_loss"] == pytest.approx(
            sum(seed["validation_loss"] for seed in seeds) / 2
        )
        for seed in seeds:
            assert len(seed["window_losses"]) == 4 and len(seed["train_loss_curve"]) == 2
        for layer in run["layers"]:  # loads sum to experts per token; histograms count tokens
            assert len(layer["expert_load"]) == 8
            assert sum(layer["expert_load"]) == pytest.approx(layer["real_experts_per_token"])
            assert sum(layer["real_experts_histogram"]) == layer["tokens"] == 2 * 4 * 64
    table = (out / "results.txt").read_text()
    assert "AdaMoE 8 + 16 null" in table and "vs top-2 (paired)" in table and "Verdict" in table
    if plotting:
        assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The second run finds both checkpoints and skips pretraining: same numbers.
    before = _numbers(out / "results.json")
    assert main(["demo", *TINY, "--seeds", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("pretraining skipped") == 2 and "pretrain top-2" not in printed.err
    assert _numbers(out / "results.json") == before
    assert json.loads((out / "results.json").read_text())["pretraining"]["0"]["cached"] is True
    # ...and a changed pretraining setting trains (and caches) a new checkpoint.
    changed = [*TINY, "--seeds", "0", "--pretrain-lr", "0.01", "--out", str(out)]
    assert main(["demo", *changed]) == 0
    assert "pretraining skipped" not in capsys.readouterr().out
    assert len(sorted(out.glob("pretrained-*.pt"))) == 3


@pytest.mark.usefixtures("torch_plugin")
def test_conversion_starts_from_the_pretrained_model(tmp_path):
    import torch
    from moerouter_torch.demo import _settings
    from moerouter_torch.demo.data import load_corpus
    from moerouter_torch.demo.runs import RUNS
    from moerouter_torch.demo.train import evaluate, make_model

    args = argparse.Namespace(
        batch_size=2, context=16, dim=16, expert_width=16, pretrain_steps=1, pretrain_lr=1e-3,
        steps=1, lr=1e-3, windows=4, window_bytes=64,
    )  # fmt: skip
    settings = _settings(args, 0, "cpu", 1)
    corpus = load_corpus(200_000)
    model = make_model(RUNS["top2"].scratch(), settings)
    for parameter in model.parameters():  # a trained-looking, not a freshly initialised gate
        parameter.data.add_(torch.randn_like(parameter) * 0.3)
    before = evaluate(model, corpus, settings)["window_losses"]
    for name in ("adamoe-8", "adamoe-16"):
        converted = make_model(RUNS["top2"].scratch(), settings)
        converted.load_state_dict(model.state_dict())
        for layer in converted.moe_layers():
            RUNS[name].fine_tune(layer)
        assert evaluate(converted, corpus, settings)["window_losses"] == before


@pytest.mark.usefixtures("torch_plugin")
def test_from_scratch_and_the_seed_matters(tmp_path, capsys):
    runs = ["--policies", "top2,adamoe-16", "--from-scratch"]
    for folder, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = tmp_path / folder
        assert main(["demo", *TINY, *runs, "--seeds", seed, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "trained from scratch for 5 steps" in printed.out
    assert not list((tmp_path / "a").glob("pretrained-*.pt"))  # nothing pretrained
    document = json.loads((tmp_path / "a" / "results.json").read_text())
    assert document["mode"] == "from-scratch" and list(document["runs"]) == ["top2", "adamoe-16"]
    assert _numbers(tmp_path / "a" / "results.json") == _numbers(tmp_path / "b" / "results.json")
    assert _numbers(tmp_path / "a" / "results.json") != _numbers(tmp_path / "c" / "results.json")


@pytest.mark.usefixtures("torch_plugin")
def test_without_matplotlib_the_plot_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    argv = ["demo", *TINY, "--policies", "top2,top1", "--from-scratch", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.txt").exists()
    assert not (tmp_path / "demo.png").exists()


@pytest.mark.usefixtures("torch_plugin")
def test_peers_run_beside_adamoe_with_their_causal_figures(tmp_path, capsys):
    # --peers adds the four peers after the named runs, each once.
    argv = [*TINY, "--policies", "top2,top-p", "--peers", "--out", str(tmp_path)]
    assert main(["demo", *argv]) == 0
    printed = capsys.readouterr().out
    document = json.loads((tmp_path / "results.json").read_text())
    runs = document["runs"]
    assert list(runs) == ["top2", "top-p", "relu", "causal-ec-threshold", "causal-ec-predictor"]
    assert document["settings"]["policies"] == list(runs)
    assert runs["top-p"]["router"].startswith("TopPRouter(TopP(num_experts=8, p=0.22")
    assert runs["causal-ec-predictor"]["router"].startswith("CausalExpertChoiceRouter(")
    for run in runs.values():  # every figure the AdaMoE runs have
        assert 0 <= run["real_experts_per_token"] <= 8
        assert run["expert_flops_vs_top2"] == pytest.approx(run["real_experts_per_token"] / 2)
        assert run["validation_loss_se"] > 0 and run["difference_vs_top2"]["se"] >= 0
        for layer in run["layers"]:
            assert len(layer["expert_load"]) == 8
            assert sum(layer["expert_load"]) == pytest.approx(layer["real_experts_per_token"])
            assert sum(layer["real_experts_histogram"]) == layer["tokens"] == 4 * 64
    assert all(layer["l1_coefficient"] > 0 for layer in runs["relu"]["layers"])
    capacity = math.ceil(1.5 * 2 * 16 / 8)  # cf 1.5, training groups of batch x context tokens
    for name in ("causal-ec-threshold", "causal-ec-predictor"):
        causal = runs[name]["causal"]
        for field in ("agreement", "recall", "precision"):
            assert 0.0 <= causal[field] <= 1.0
        assert causal["capacity"] == capacity
        for layer in runs[name]["layers"]:  # the causal rule's load, per group, against C
            assert layer["compared_tokens"] == 4 * 64
            realised = layer["realised_capacity"]
            assert len(realised) == 8 and min(realised) >= 0
            assert sum(realised) * (4 * 64 // 32) == pytest.approx(
                sum(layer["expert_load"]) * layer["tokens"]
            )
            assert layer["realised_capacity_vs_c"] == pytest.approx(
                [value / capacity for value in realised]
            )
        assert f"{runs[name]['label']}: the causal decision agrees with batch expert" in printed
    table = (tmp_path / "results.txt").read_text()
    assert "causal EC predictor, cf 1.5" in table and "Realised capacity per expert / C" in table


@pytest.mark.usefixtures("torch_plugin")
def test_peers_train_from_scratch(tmp_path):
    argv = [*TINY, "--from-scratch", "--policies", "top2,relu,causal-ec-threshold"]
    assert main(["demo", *argv, "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs["relu"]["router"].startswith("ReLURouter(ReLURouting(")
    assert 0.0 <= runs["causal-ec-threshold"]["causal"]["agreement"] <= 1.0


def _adaptive_layer(router_factory):
    import torch
    from moerouter_torch import MoE

    import moerouter as mr

    torch.manual_seed(0)
    layer = MoE(8, 8, mr.TopK(8, k=2), activation="gelu")
    router_factory(layer)
    return layer


@pytest.mark.usefixtures("torch_plugin")
@pytest.mark.parametrize("name", ["causal-ec-threshold", "causal-ec-predictor", "top-p", "relu"])
def test_peers_route_causally_at_evaluation(name):
    """In eval mode a token's route and output do not depend on the tokens after it."""
    import torch
    from moerouter_torch.demo.runs import RUNS

    layer = _adaptive_layer(RUNS[name].fine_tune)
    tokens = torch.randn(64, 8)
    layer.train()
    layer(tokens)  # one training batch: thresholds, group size
    layer.eval()
    with torch.no_grad():
        whole, _ = layer(tokens)
        changed = tokens.clone()
        changed[32:] = torch.randn(32, 8) * 3  # other later tokens
        prefix, _ = layer(changed)
    assert torch.equal(whole[:32], prefix[:32])


@pytest.mark.usefixtures("torch_plugin")
def test_causal_thresholds_follow_training_and_the_predictor_starts_as_the_gate():
    import torch
    from moerouter_torch.demo.runs import RUNS

    layer = _adaptive_layer(RUNS["causal-ec-threshold"].fine_tune)
    router = layer.router
    assert torch.isinf(router.thresholds).all() and int(router.group_size) == 0
    with pytest.raises(RuntimeError, match="never trained"):
        router.figures(torch.zeros(4, 8), None)
    layer.train()
    layer(torch.randn(64, 8))
    assert torch.isfinite(router.thresholds).all() and int(router.updates) == 1
    assert int(router.group_size) == 64
    predicted = _adaptive_layer(RUNS["causal-ec-predictor"].fine_tune)
    assert torch.equal(predicted.router.predictor.weight, predicted.gate.weight)
    predicted.train()
    predicted(torch.randn(64, 8))
    losses = predicted.router.take_losses()
    assert set(losses) == {"adaptive"} and losses["adaptive"] > 0  # the predictor's BCE
    assert predicted.router.take_losses() == {}  # taken once


@pytest.mark.usefixtures("torch_plugin")
def test_causal_agreement_of_batch_expert_choice_with_itself_is_exact():
    import torch
    from moerouter_torch.demo.adaptive import causal_agreement

    import moerouter as mr

    policy = mr.CausalExpertChoice(4, capacity_factor=1.0)
    logits = torch.randn(32, 4)
    # Thresholds between each group's C-th and (C+1)-th score give batch expert choice back
    # exactly when the two groups share them; one group of 32 tokens: C = 8.
    probs = logits.softmax(-1)
    ordered = probs.sort(0, descending=True).values
    thresholds = (ordered[7] + ordered[8]) / 2
    causal = policy(logits, thresholds)
    figures = causal_agreement(policy, logits, causal, group_size=32)
    assert figures["agreement"] == figures["recall"] == figures["precision"] == 1.0
    assert figures["capacity"] == 8 and figures["realised_capacity"] == [8.0] * 4
    assert figures["realised_capacity_vs_c"] == [1.0] * 4
    # No token routed: recall 0, precision 0 (not a division by zero), agreement = 1 - C E / TE.
    none = policy(logits, torch.full((4,), 2.0))
    figures = causal_agreement(policy, logits, none, group_size=32)
    assert figures["recall"] == figures["precision"] == 0.0
    assert figures["agreement"] == pytest.approx(1 - 8 / 32)
    with pytest.raises(ValueError, match="fewer than one group of 64"):
        causal_agreement(policy, logits, causal, group_size=64)


@pytest.mark.usefixtures("torch_plugin")
def test_relu_coefficient_steers_toward_the_target_sparsity():
    import torch
    from moerouter_torch.demo.adaptive import L1_MULTIPLIER, L1_START
    from moerouter_torch.demo.runs import RUNS

    layer = _adaptive_layer(RUNS["relu"].fine_tune)  # centred gate: about half the gates > 0
    router = layer.router
    layer.train()
    tokens = torch.randn(256, 8)
    layer(tokens)
    losses = router.take_losses()
    assert float(losses["z_loss"]) == 0.0 and float(losses["load_balancing"]) == 0.0
    assert float(losses["adaptive"].detach()) > 0  # L1_START times the mean gate sum
    positive = float((layer.gate_logits(tokens) > 0).float().mean())
    assert positive > 1 - router.target_sparsity  # denser than the target: the coefficient grows
    assert float(router.coefficient) == pytest.approx(L1_START * L1_MULTIPLIER)
    with torch.no_grad():
        layer.gate.weight.fill_(-1.0)  # every gate dead: sparser than the target, it shrinks
    layer(tokens.abs())
    assert float(router.coefficient) == pytest.approx(L1_START)


@pytest.mark.usefixtures("torch_plugin")
def test_relu_router_target_is_checked():
    from moerouter_torch.demo.adaptive import ReLURouter

    import moerouter as mr

    for bad in (0, 8, -1.0):
        with pytest.raises(ValueError, match="target_k must be in"):
            ReLURouter(mr.ReLURouting(8, max_k=8), target_k=bad)


def _rejects(argv, capsys, *expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    for text in expected:
        assert text in printed.err
    assert "moerouter demo:" not in printed.out  # rejected before anything was trained


BAD_OPTIONS = [
    # A policy that does not exist (expert choice is deliberately absent: not causal).
    pytest.param(
        ["--policies", "top2,expert-choice"], ["--policies", "'expert-choice'"], id="policy"
    ),
    pytest.param(["--policies", ","], ["--policies", "(none given)"], id="no-policy"),
    # Every difference is taken against top-2.
    pytest.param(["--policies", "top1"], ["--policies", "must include 'top2'"], id="no-top2"),
    pytest.param(["--steps", "0"], ["--steps", "must be >= 1"], id="steps-zero"),
    pytest.param(["--steps", "many"], ["--steps", "must be an integer"], id="steps-text"),
    pytest.param(["--seeds", "0,x"], ["--seeds", "comma-separated integers"], id="seeds-text"),
    pytest.param(["--seeds", "1,1"], ["--seeds", "named twice"], id="seeds-twice"),
    pytest.param(["--lr", "-1"], ["--lr", "finite number > 0"], id="lr-negative"),
    pytest.param(["--window-bytes", "100"], ["--window-bytes", "multiple of --context"], id="win"),
    pytest.param(["--windows", "1"], ["--windows", "must be >= 2"], id="one-window"),
    pytest.param(["--dim", "18"], ["--dim", "multiple of 4"], id="dim"),
    pytest.param(["--peers", "yes"], ["unrecognized arguments: yes"], id="peers-value"),
    pytest.param(["--peers=1"], ["--peers", "ignored explicit argument"], id="peers-explicit"),
]


@pytest.mark.usefixtures("torch_plugin")
@pytest.mark.parametrize(("argv", "expected"), BAD_OPTIONS)
def test_bad_option_is_named(argv, expected, capsys, tmp_path):
    _rejects([*TINY, *argv, "--out", str(tmp_path / "out")], capsys, *expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("torch_plugin")
def test_windows_that_do_not_fit_are_named(tmp_path, capsys):
    argv = [*TINY, "--windows", "100000", "--out", str(tmp_path)]
    assert main(["demo", *argv]) == 2
    assert "--windows: 100000 windows of 64 bytes do not fit" in capsys.readouterr().err


@pytest.mark.usefixtures("torch_plugin")
def test_unwritable_output_folder_is_named(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made inside a file, even by root
    _rejects([*TINY, "--out", str(blocker / "out")], capsys, "--out", "not a writable folder")


@pytest.mark.usefixtures("torch_plugin")
def test_unknown_device_is_named(tmp_path, capsys):
    _rejects([*TINY, "--device", "warp-drive", "--out", str(tmp_path)], capsys, "--device")
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("module", ["torch", "moerouter_torch", "moerouter_torch.demo"])
def test_missing_torch_or_plugin_is_named(module, tmp_path, capsys, monkeypatch):
    if module != "torch":
        pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed, even where it is
    _rejects(
        [*TINY, "--out", str(tmp_path / "out")], capsys, f"the demo needs {module}", "pip install"
    )
    assert not (tmp_path / "out").exists()


def test_the_core_cli_imports_no_framework_until_the_demo_runs():
    script = (
        "import sys, moerouter.__main__\n"
        "print(','.join(m for m in ('torch', 'matplotlib', 'moerouter_torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


# --- statistics (framework-free) -----------------------------------------------------------------


def _statistics():
    pytest.importorskip("torch")
    from moerouter_torch.demo import statistics

    return statistics


def test_paired_difference_recovers_a_known_shift():
    statistics = _statistics()
    rng = random.Random(0)
    difficulty = [rng.gauss(2.0, 0.5) for _ in range(400)]  # windows differ a lot...
    noise = 0.01
    baseline = [d + rng.gauss(0, noise) for d in difficulty]
    shifted = [d + 0.03 + rng.gauss(0, noise) for d in difficulty]  # ...the runs by 0.03
    unpaired = statistics.estimate(shifted)
    paired = statistics.difference(shifted, baseline)
    # the true SE of the paired mean is noise * sqrt(2 / n)
    assert paired.se == pytest.approx(noise * (2 / 400) ** 0.5, rel=0.15)
    assert abs(paired.mean - 0.03) < 3 * paired.se
    assert unpaired.se > 20 * paired.se  # the windows' difficulty cancels only when paired
    assert paired.mean / paired.se > 2  # the 0.03 is resolved


def test_estimate_exact_values_and_errors():
    statistics = _statistics()
    result = statistics.estimate([1.0, 2.0, 3.0, 4.0])
    assert result == {"mean": 2.5, "se": pytest.approx((5 / 3 / 4) ** 0.5)}
    assert result.mean == 2.5
    with pytest.raises(ValueError, match="at least 2 windows"):
        statistics.estimate([1.0])
    with pytest.raises(ValueError, match="same windows"):
        statistics.difference([1.0, 2.0], [1.0])
    assert statistics.seed_average({0: [1.0, 3.0], 1: [2.0, 5.0]}) == [1.5, 4.0]
    with pytest.raises(ValueError, match="same windows"):
        statistics.seed_average({0: [1.0], 1: [1.0, 2.0]})


def test_versus_line_is_zero_on_the_line():
    statistics = _statistics()
    top1, top2 = [2.0, 2.2, 1.9], [1.8, 2.1, 1.7]
    halfway = [(a + b) / 2 for a, b in zip(top1, top2, strict=True)]
    on_line = statistics.versus_line(halfway, top1, top2, 1.5)
    assert on_line.mean == pytest.approx(0.0) and on_line.se == pytest.approx(0.0, abs=1e-12)
    above = statistics.versus_line([v + 0.1 for v in halfway], top1, top2, 1.5)
    assert above.mean == pytest.approx(0.1)
    assert statistics.line_weights(2.5) == (-0.5, 1.5)  # extrapolated beyond top-2


def test_progress_bar_off_a_terminal_prints_each_tenth():
    pytest.importorskip("torch")
    from moerouter_torch.demo.report import ProgressBar

    stream = io.StringIO()  # not a terminal: one line per tenth, never a carriage return
    bar = ProgressBar("top-2 of 8", total=100, tokens_per_step=64, stream=stream)
    for step in range(1, 101):
        bar.update(step, loss=2.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in stream.getvalue()  # steps 1, 10, 20, ..., 100
    assert lines[-1].startswith("top-2 of 8") and "100/100" in lines[-1] and "#" * 24 in lines[-1]
