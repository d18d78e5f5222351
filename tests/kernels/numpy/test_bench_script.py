"""The benchmark script runs and reports every number the issue asks for (tiny shape, no timing
assertions: timings are benchmarks, never tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("bench_numpy.py")


def test_bench_reports_bandwidth_and_speedups():
    arguments = ["--tokens", "64", "--features", "32", "--experts", "8", "--k", "2"]
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments, "--repeats", "1", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads(completed.stdout)
    assert report["shape"] == {"T": 64, "d": 32, "E": 8, "k": 2, "dtype": "float32"}
    for kernel in ("dispatch", "combine"):
        assert {"ms", "GBps", "bw_efficiency", "speedup_vs_agnostic"} <= set(report[kernel])
    assert report["make_plan"]["speedup_vs_agnostic"] > 0
    assert report["copy"]["GBps"] > 0
