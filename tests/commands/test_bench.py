"""``python -m moerouter bench`` runs and prints its table; timings are never asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moerouter import _bench


def test_bench_prints_the_table(capsys):
    # The smallest run CI can afford: one shape, one backend, one timed repeat.
    status = _bench.main(["--shape", "ci-tiny", "--repeat", "1", "--backend", "numpy"])
    out = capsys.readouterr().out
    assert status == 0
    assert "copy roof numpy" in out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for column in ("backend", "shape", "dtype", "median ms", "GB/s", "bw_eff", "vs naive"):
        assert column in header
    for op in ("route TopK", "route ExpertChoice", "make_plan", "dispatch", "combine naive"):
        assert any(line.startswith(op) and "ci-tiny" in line for line in out.splitlines())


def test_minimal_bytes_count_each_row_once():
    # OLMoE-like, no drops: T tokens read once, R = T*k rows written, R int32 indices.
    tokens, k, dim = 4096, 8, 2048
    rows = tokens * k
    assert _bench.dispatch_bytes(tokens_read=tokens, rows=rows, dim=dim, itemsize=4) == (
        (tokens + rows) * dim * 4 + rows * 4
    )
    # Combine reads the R rows plus an index and a weight each, and writes T rows.
    assert _bench.combine_bytes(tokens=tokens, rows=rows, dim=dim, itemsize=4) == (
        (rows + tokens) * dim * 4 + rows * 8
    )


def test_numpy_bench_leaves_torch_unimported():
    # Frameworks are imported only when asked for, even by the bench.
    code = (
        "import sys, contextlib, io\n"
        "from moerouter import _bench\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    status = _bench.main(['--shape', 'ci-tiny', '--repeat', '1', '--backend', 'numpy',"
        " '--roof-mib', '8'])\n"
        "assert status == 0, status\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda tmp: tmp / "missing" / "x.json", id="missing-folder"),
        pytest.param(lambda tmp: tmp, id="a-folder"),
    ],
)
def test_unwritable_json_path_exits_2_before_benchmarking(capsys, tmp_path, where):
    # The path is checked first: a typo must not cost a whole benchmark run and a traceback.
    path = where(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _bench.main(
            ["--shape", "ci-tiny", "--repeat", "1", "--backend", "numpy", "--json", str(path)]
        )
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert f"--json {str(path)!r} cannot be written" in captured.err
    assert "copy roof" not in captured.out  # nothing was benchmarked


def test_json_is_written(tmp_path):
    path = tmp_path / "bench.json"
    status = _bench.main(
        [
            "--shape",
            "ci-tiny",
            "--repeat",
            "1",
            "--backend",
            "numpy",
            "--path",
            "auto",
            "--roof-mib",
            "8",
            "--json",
            str(path),
        ]
    )
    assert status == 0
    assert "results" in path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # the probe left nothing
