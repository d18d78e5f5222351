"""``python -m moerouter bench --router``: every token-choice router against the eager top-k."""

from __future__ import annotations

import json

import pytest

from moerouter import _bench


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
