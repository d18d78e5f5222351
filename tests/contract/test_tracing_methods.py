"""The new policies trace under ``torch.compile`` as one graph and give the eager routing.

(``jax.jit`` is tested beside each policy's equivalence tests.)
"""

from __future__ import annotations

import numpy as np
import pytest

import moerouter as mr
from moerouter.testing import assert_close, edge_case_logits, to_numpy

NUM_TOKENS, NUM_EXPERTS = 16, 8
RNG = np.random.default_rng(40)
SIDE_INPUTS = {
    "locality": RNG.integers(0, 4, NUM_TOKENS).astype(np.int32),  # token nodes
    "anchor": RNG.integers(-1, 3, NUM_TOKENS).astype(np.int32),  # anchor ids
    "affinity": RNG.uniform(-1, 1, (NUM_TOKENS, NUM_EXPERTS)).astype(np.float32),
}
ROUTERS = [
    # Node masks and capacity must stay shape-static.
    pytest.param(
        "locality",
        mr.policies.LocalityTopK(NUM_EXPERTS, 2, num_nodes=4, max_nodes=2, capacity_factor=0.75),
        id="locality",
    ),
    # The one-hot anchor means: a matmul, no scatter.
    pytest.param(
        "anchor",
        mr.policies.AnchorRouting(mr.TopK(num_experts=NUM_EXPERTS, k=2), num_anchors=3),
        id="anchor",
    ),
    # Affinity ranking across tokens and the capacity drop.
    pytest.param(
        "affinity",
        mr.policies.AffinityRouting(num_experts=NUM_EXPERTS, capacity_factor=0.5),
        id="affinity",
    ),
]


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")


# array-api-compat's is_array_api_obj is lru_cache-wrapped; dynamo warns that it traces through the
# cache, which is harmless here (the cached predicate is a pure function of the type).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize(("kind", "router"), ROUTERS)
def test_torch_compile_equals_eager(reference_backend, kind, router):
    torch = pytest.importorskip("torch")
    logits = torch.asarray(edge_case_logits(1, NUM_TOKENS, NUM_EXPERTS, seed=41)[0])
    side = torch.asarray(SIDE_INPUTS[kind])

    def layer(logits, side):
        routing = router(logits, side)
        return routing.expert_ids, routing.weights

    eager = layer(logits, side)
    # aot_eager traces forward and backward graphs as inductor would, without code generation.
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(logits, side)
    np.testing.assert_array_equal(to_numpy(compiled[0]), to_numpy(eager[0]))
    assert_close(compiled[1], eager[1], "weights", rtol=1e-6, atol=0.0)
