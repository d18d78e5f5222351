"""``python -m moerouter bench`` runs and prints its table; timings are never asserted."""

from __future__ import annotations

import subprocess
import sys

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
