"""``python -m moerouter simulate``: end to end at a small size, from a trace, and bad options."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import moerouter as mr
from moerouter import simulate, traces, workloads
from moerouter.__main__ import main

SMALL = ["--world", "8", "--experts", "16", "--k", "2", "--tokens-per-rank", "12"]
SMALL += ["--ranks-per-node", "4", "--hidden", "8", "--bytes-per-element", "2"]


def plotting():
    try:
        import matplotlib  # noqa: F401  (optional: plots are written exactly when it is present)
    except ImportError:
        return False
    return True


def test_grid_of_policies_and_workloads(tmp_path, capsys):
    out = tmp_path / "nested" / "out"
    argv = ["simulate", "--workload", "zipf:1.2", "uniform", "--policy", "topk", "adamoe:8"]
    argv += ["locmoe:1", *SMALL, "--layers", "2", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AdaMoE +8 null" in printed and "LocMoE, 1 node" in printed
    assert str(out / "results.json") in printed
    document = json.loads((out / "results.json").read_text())
    assert document["command"].startswith("python -m moerouter simulate --workload zipf:1.2")
    assert document["settings"]["world"] == 8
    runs = document["runs"]
    assert [(run["policy"], run["workload"]) for run in runs] == [
        (policy, workload)
        for workload in ("zipf:1.2", "uniform")
        for policy in ("topk", "adamoe:8", "locmoe:1")
    ]
    for run in runs:
        assert run["layer"] == [0, 1, 0, 1] and run["step"] == [0, 0, 1, 1]
        assert sum(run["tokens"]) == 4 * 8 * 12
        if run["policy"] == "topk":
            assert run["totals"]["real_experts_per_token"] == 2.0
        if run["policy"] == "adamoe:8":
            assert 0 < run["totals"]["null_saved"] < 1
        if run["policy"] == "locmoe:1":
            assert run["totals"]["inter_node_share"] == 0.0
    with np.load(out / "results.npz") as archive:
        assert archive["dispatch_bytes_0"].shape == (8, 8)
    table = (out / "results.txt").read_text()
    assert "max rank out" in table and table.startswith("python -m moerouter simulate")
    for name in ("traffic.png", "load.png"):
        assert (out / name).exists() == plotting()
        if plotting():
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_equals_the_library(tmp_path, capsys):
    # The command's figures are simulate.run's on the same routing, seeds and all.
    out = tmp_path / "out"
    assert (
        main(["simulate", "--workload", "zipf:1.1", *SMALL, "--seed", "3", "--out", str(out)]) == 0
    )
    capsys.readouterr()
    run = json.loads((out / "results.json").read_text())["runs"][0]
    logits = workloads.zipf(8 * 12, 16, exponent=1.1, seed=(3, 0, 0), structure_seed=(3, 0))
    routing = mr.TopK(num_experts=16, k=2)(logits.reshape(8, 12, 16))
    result = simulate.run(
        routing,
        topology=simulate.Topology(world_size=8, ranks_per_node=4, intra_node_bandwidth=450e9),
        hidden_size=8,
        bytes_per_element=2,
    )
    assert run["rank_load"] == result.rank_load.tolist()
    assert run["totals"] == pytest.approx(result.totals())


def test_from_a_trace_recorded_and_replayed(tmp_path, capsys):
    router = traces.traced(mr.TopK(num_experts=16, k=2), layer=0)
    with traces.record(logits=True) as recorder:
        for step in range(2):
            router(workloads.zipf(96, 16, seed=step))
    path = tmp_path / "trace.npz"
    recorder.save(path)
    out = tmp_path / "out"
    argv = ["simulate", "--trace", str(path), "--world", "8", "--ranks-per-node", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["policy"] == "recorded" and run["step"] == [0, 1]
    assert run["totals"]["real_experts_per_token"] == 2.0
    # Replayed through another policy, from the recorded logits.
    assert main([*argv, "--policy", "topk", "expert_choice:1.0", "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [run["policy"] for run in runs] == ["topk", "expert_choice:1.0"]
    assert runs[1]["totals"]["real_experts_per_token"] == 1.0
    assert "trace.npz" in capsys.readouterr().out


def test_placement_from_a_file(tmp_path, capsys):
    table = tmp_path / "placement.npy"
    np.save(table, np.arange(16) % 8)
    out = tmp_path / "out"
    argv = ["simulate", "--workload", "uniform", *SMALL, "--placement", str(table)]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["runs"][0]["names"] == [""]
    capsys.readouterr()


def record_without_logits(folder):
    with traces.record() as recorder:
        traces.traced(mr.TopK(num_experts=16, k=2), layer=0)(workloads.uniform(16, 16))
    recorder.save(folder / "plain.npz")
    return str(folder / "plain.npz")


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--workload", "pareto:1"], "--workload"),  # not a generator
        (["--workload", "zipf:-2"], "--workload"),  # a bad parameter value
        (["--workload", "uniform", "--policy", "softmax"], "--policy"),  # not a policy
        (["--workload", "uniform", "--policy", "adamoe"], "--policy"),  # nulls missing
        (["--workload", "uniform", "--policy", "topk:-1"], "--policy"),  # bad capacity factor
        (["--workload", "uniform", "--k", "40"], "--policy"),  # k > E for top-k
        (["--workload", "uniform", "--policy", "locmoe:9"], "--policy"),  # more nodes than exist
        (["--workload", "uniform", "--world", "0"], "--world"),
        (["--workload", "uniform", "--world", "12"], "--placement"),  # 16 experts on 12 ranks
        (["--workload", "uniform", "--placement", "diagonal"], "--placement"),
        (["--workload", "uniform", "--placement", "missing.npy"], "--placement"),
        (["--workload", "uniform", "--inter-bandwidth", "0"], "--inter-bandwidth"),
        (["--workload", "uniform", "--inter-latency", "-1"], "--inter-latency"),
        (["--workload", "uniform", "--capacity-factor", "nan"], "--capacity-factor"),
        (["--workload", "uniform", "--seed", "-1"], "--seed"),
        (["--trace", "missing.npz"], "--trace"),
        (["--trace", "PLAIN", "--policy", "topk"], "--policy"),  # replay needs logits
        (["--trace", "x.npz", "--workload", "uniform"], "--workload"),  # not both
        ([], "--trace"),  # neither
    ],
)
def test_bad_options_exit_2_naming_the_option(argv, option, tmp_path, capsys):
    argv = [record_without_logits(tmp_path) if item == "PLAIN" else item for item in argv]
    defaults = {"--world": "8", "--experts": "16", "--k": "2", "--tokens-per-rank": "4"}
    for name, value in defaults.items():
        if name not in argv:
            argv += [name, value]
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", *argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_out_folder_must_be_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--workload", "uniform", *SMALL, "--out", str(blocker / "sub")])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_help_lists_the_subcommand():
    completed = subprocess.run(
        [sys.executable, "-m", "moerouter", "simulate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--workload" in completed.stdout and "--trace" in completed.stdout


def test_heatmap_blocks_keep_every_byte():
    from moerouter.simulate._command import HEATMAP_CELLS, _blocks

    matrix = np.arange(300 * 300, dtype=np.int64).reshape(300, 300)
    summed = _blocks(matrix)
    assert summed.shape == (100, 100) and 300 > HEATMAP_CELLS  # blocks of 3 ranks
    assert summed.sum() == matrix.sum()
    assert summed[0, 0] == matrix[:3, :3].sum()
    small = np.eye(4, dtype=np.int64)
    np.testing.assert_array_equal(_blocks(small), small)  # up to 128 ranks: as is
