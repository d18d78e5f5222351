"""The per-layer hot path's shortcuts give exactly what the general code gives (issue 16 item 4)."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

import moerouter as mr
from moerouter._agnostic import select
from moerouter.losses import _shared

LIBRARIES = ["numpy", "torch"]


def _asarray(library: str, host: np.ndarray):
    if library == "numpy":
        return host
    torch = pytest.importorskip(library)
    return torch.from_numpy(host)


def _logits(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    host = rng.integers(-2, 3, (40, 12)).astype(np.float32)  # many ties
    host[0, 3] = np.nan
    host[1, :] = -np.inf
    host[2, 5] = np.inf
    host[3, :7] = -np.inf  # fewer finite columns than some k
    return host


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("k", [1, 3, 12])
@pytest.mark.parametrize("convention", ["megatron", "mixtral", "gshard"])
def test_balancing_counts_choices_only_when_they_are_the_top_k(library, k, convention, monkeypatch):
    logits = _asarray(library, _logits(k))
    bias = _asarray(library, np.linspace(-1, 1, 12, dtype=np.float32))
    routings = [
        mr.TopK(12, k)(logits),  # its choices are the top-k: the shortcut applies
        mr.TopK(12, k, score="sigmoid")(logits),
        mr.DeepSeekTopK(12, k)(logits, bias),  # biased choices: the general count runs
    ]
    top_k = routings[0]
    assert _shared._choices_are_top_k(top_k, top_k.finite_rows, array_namespace(logits))
    fast = [mr.losses.load_balancing(r, convention=convention) for r in routings]
    monkeypatch.setattr(_shared, "_choices_are_top_k", lambda *args: False)
    general = [mr.losses.load_balancing(r, convention=convention) for r in routings]
    for got, expected in zip(fast, general, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("library", LIBRARIES)
def test_bincount_counts_the_ids_in_range(library):
    # torch CPU adds the ids up, other arrays sort them (unstably): both count exactly.
    host = np.random.default_rng(0).integers(-3, 20, 1000).astype(np.int32)
    ids = _asarray(library, host)
    got = select.bincount(ids, 17, xp=array_namespace(ids), device="cpu")
    expected = np.bincount(host[(host >= 0) & (host < 17)], minlength=17)
    assert np.array_equal(np.asarray(got), expected)
