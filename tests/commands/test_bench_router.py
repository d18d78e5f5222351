"""``python -m moerouter bench --router``: every token-choice router against the eager top-k."""

from __future__ import annotations

import json

import pytest

from moerouter import _bench, _benchlib


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_router_table_has_every_router_and_path(backend, tmp_path, capsys):
    pytest.importorskip(backend)
    path = tmp_path / "routers.json"
    arguments = ["--router", "--shape", "ci-tiny", "--repeat", "1", "--backend", backend]
    assert _bench.main([*arguments, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["routers"]
    # Five routers (DeepSeek with and without groups), each on the kernel and agnostic paths.
    assert len(rows) == 10
    assert {row["path"] for row in rows} == {"kernel", "agnostic"}
    assert all(row["backend"] == backend and row["vs_eager"] > 0 for row in rows)
    assert "vs eager" in capsys.readouterr().out


def test_router_table_keeps_to_the_asked_path(tmp_path):
    path = tmp_path / "routers.json"
    arguments = ["--router", "--shape", "ci-tiny", "--repeat", "1", "--backend", "numpy"]
    assert _bench.main([*arguments, "--path", "auto", "--json", str(path)]) == 0
    assert {row["path"] for row in json.loads(path.read_text())["routers"]} == {"kernel"}


def test_paired_timing_alternates_and_warms_both():
    # Each call sees the other's as often before as after it, after the warm-up rounds.
    calls = []
    first, second = _benchlib.paired_median_seconds(
        lambda: calls.append("a"), lambda: calls.append("b"), repeat=4, warmup=2
    )
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert first >= 0 and second >= 0
