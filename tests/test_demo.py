"""``python -m moerouter demo``: end to end at a tiny size, reproducibility, and every bad input.

The training tests need torch and the torch plugin and skip without them (the ``tests_core``
session); the input checks that need neither run everywhere.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from moerouter.__main__ import main

# A model small enough that all four policies train and validate in a few seconds on 2 cores;
# one thread, because several threads on a busy machine spin and wait for each other.
TINY = ["--steps", "3", "--batch-size", "2", "--context", "16", "--dim", "16"]
TINY += ["--eval-batches", "1", "--threads", "1"]
TIMING = ("train_seconds", "tokens_per_second")


@pytest.fixture
def torch_plugin():
    pytest.importorskip("torch")
    pytest.importorskip("moerouter_torch")


def _numbers(path):
    """Every figure of results.json except the machine-dependent timings."""
    document = json.loads(path.read_text())
    for run in document["runs"].values():
        for field in TIMING:
            run.pop(field)
    return document["runs"]


@pytest.mark.usefixtures("torch_plugin")
def test_end_to_end_writes_table_json_and_plot(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401  (optional: the plot is written exactly when it is present)

        plotting = True
    except ImportError:
        plotting = False
    out = tmp_path / "nested" / "out"  # the folder is created, parents included
    assert main(["demo", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert str(out / "results.json") in printed.out
    assert ("demo.png" in printed.out) is plotting
    assert "expert choice is left out" in printed.out  # the note on causality
    assert "3/3" in printed.err  # every run's progress bar reached its end

    document = json.loads((out / "results.json").read_text())
    assert document["command"].startswith("python -m moerouter demo --steps 3")
    assert document["settings"]["threads"] == 1
    runs = document["runs"]
    assert list(runs) == ["top1", "top2", "adamoe-8", "adamoe-16"]
    assert runs["top1"]["real_experts_per_token"] == 1.0  # no capacity: nothing is dropped
    assert runs["top2"]["real_experts_per_token"] == 2.0
    for name, run in runs.items():
        assert 0.0 <= run["real_experts_per_token"] <= 4.0
        assert run["expert_flops_vs_top2"] == pytest.approx(run["real_experts_per_token"] / 2)
        assert run["validation_loss"] > 0 and run["tokens_per_second"] > 0
        assert len(run["train_loss_curve"]) == 3
        for layer in run["layers"]:  # the heatmap rows: load shares sum to experts per token
            assert len(layer["expert_load"]) == 8
            assert sum(layer["expert_load"]) == pytest.approx(layer["real_experts_per_token"])
            assert sum(layer["real_experts_histogram"]) == layer["tokens"]
        if name.startswith("adamoe"):
            assert run["line_loss"] is not None
    table = (out / "results.txt").read_text()
    assert "AdaMoE 8 + 16 null" in table and "real experts/tok" in table
    if plotting:
        assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "demo.png").exists()


@pytest.mark.usefixtures("torch_plugin")
def test_same_seed_same_numbers(tmp_path, capsys):
    policies = ["--policies", "top2,adamoe-16"]
    for folder, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = tmp_path / folder
        assert main(["demo", *TINY, *policies, "--seed", seed, "--out", str(out)]) == 0
    capsys.readouterr()
    assert _numbers(tmp_path / "a" / "results.json") == _numbers(tmp_path / "b" / "results.json")
    # ...and the seed matters (guards against a seed that is silently ignored).
    assert _numbers(tmp_path / "a" / "results.json") != _numbers(tmp_path / "c" / "results.json")


@pytest.mark.usefixtures("torch_plugin")
def test_without_matplotlib_the_plot_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["demo", *TINY, "--policies", "top1", "--out", str(tmp_path)]) == 0
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.txt").exists()
    assert not (tmp_path / "demo.png").exists()


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
        ["--policies", "top1,expert-choice"], ["--policies", "'expert-choice'"], id="policy"
    ),
    # An empty policy list.
    pytest.param(["--policies", ","], ["--policies", "(none given)"], id="no-policy"),
    # Zero steps would train nothing.
    pytest.param(["--steps", "0"], ["--steps", "must be >= 1"], id="steps-zero"),
    # Not a number at all.
    pytest.param(["--steps", "many"], ["--steps", "must be an integer"], id="steps-text"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_OPTIONS)
def test_bad_option_is_named(argv, expected, capsys, tmp_path):
    _rejects([*argv, "--out", str(tmp_path / "out")], capsys, *expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("torch_plugin")
def test_unwritable_output_folder_is_named(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made inside a file, even by root
    _rejects([*TINY, "--out", str(blocker / "out")], capsys, "--out", "not a writable folder")


@pytest.mark.usefixtures("torch_plugin")
def test_unknown_device_is_named(tmp_path, capsys):
    _rejects([*TINY, "--device", "warp-drive", "--out", str(tmp_path)], capsys, "--device")
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "module",
    [
        "torch",  # runs everywhere: real where torch is absent, simulated where it is present
        "moerouter_torch",  # torch installed but not the plugin (needs torch, else torch is named)
    ],
)
def test_missing_torch_is_named(module, tmp_path, capsys, monkeypatch):
    if module == "moerouter_torch":
        pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed, even where it is
    _rejects([*TINY, "--out", str(tmp_path / "out")], capsys, f"the demo needs {module}")
    assert not (tmp_path / "out").exists()


def test_demo_module_imports_no_framework():
    script = (
        "import sys, moerouter.__main__, moerouter._demo\n"
        "print(','.join(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_progress_bar_off_a_terminal_prints_each_tenth():
    from moerouter._demo.report import ProgressBar

    stream = io.StringIO()  # not a terminal: one line per tenth, never a carriage return
    bar = ProgressBar("top-2 of 8", total=100, tokens_per_step=64, stream=stream)
    for step in range(1, 101):
        bar.update(step, loss=2.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in stream.getvalue()  # steps 1, 10, 20, ..., 100
    assert lines[-1].startswith("top-2 of 8") and "100/100" in lines[-1] and "#" * 24 in lines[-1]


def test_line_through_top1_and_top2():
    from moerouter._demo.report import line_between

    runs = {
        "top1": {"validation_loss": 2.0, "real_experts_per_token": 1.0},
        "top2": {"validation_loss": 1.8, "real_experts_per_token": 2.0},
    }
    assert line_between(runs, 1.5) == pytest.approx(1.9)
    assert line_between(runs, 2.5) == pytest.approx(1.7)  # extrapolated, flagged in the table
    assert line_between({"top2": runs["top2"]}, 1.5) is None  # no line without both ends
