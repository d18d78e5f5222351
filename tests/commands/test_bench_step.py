"""``python -m moerouter bench --step``: a whole routing step against transformers' OLMoE block."""

from __future__ import annotations

import json

import pytest

from moerouter import _bench


def test_step_table_times_both_sides_and_agrees(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = tmp_path / "step.json"
    arguments = ["--step", "--shape", "ci-tiny", "--repeat", "1", "--json", str(path)]
    assert _bench.main(arguments) == 0  # 1 when the outputs or the losses disagree
    rows = json.loads(path.read_text())["step"]
    pieces = {(row["side"], row["piece"]) for row in rows}
    assert ("moerouter", "stats.summary") in pieces
    assert ("olmoe", "per-expert gather/index_add") in pieces
    (whole,) = [r for r in rows if r["side"] == "moerouter" and r["piece"] == "WHOLE STEP"]
    assert whole["speedup"] > 0
    assert "speedup vs OLMoE" in capsys.readouterr().out
