"""moerouter's public conformance kit: float64 references, assertion helpers, the backend enum.

Backend plugins test themselves with it: ``pytest_plugins = ["moerouter.testing.fixtures"]``
gives the ``backend``, ``xp`` and ``use_backend`` fixtures; :func:`use_backend` switches between
the agnostic path and the plugins' kernels; :mod:`moerouter.testing.reference` holds the float64
loop references every kernel is compared with, and :mod:`moerouter.testing.asserts` the
comparisons (integers identical, floats within derived tolerances).
"""

from moerouter.testing.asserts import (
    ROUTER_ATOL,
    ROUTER_RTOL,
    assert_close,
    assert_plan_equal,
    assert_plan_valid,
    assert_routing_equal,
)
from moerouter.testing.backends import Backend, to_numpy
from moerouter.testing.reference.edge_cases import edge_case_logits
from moerouter.testing.reference.expert_choice import reference_expert_choice
from moerouter.testing.reference.losses import (
    reference_concatenated_load_balancing,
    reference_entropy,
    reference_importance_loss,
    reference_load_balancing,
    reference_load_loss,
    reference_normal_cdf,
    reference_null_load_balancing,
    reference_sequence_load_balancing,
    reference_z_loss,
)
from moerouter.testing.reference.plan import (
    reference_combine,
    reference_dispatch,
    reference_make_plan,
)
from moerouter.testing.reference.soft import (
    reference_soft_combine,
    reference_soft_dispatch,
    reference_soft_moe,
)
from moerouter.testing.reference.stats import (
    reference_co_occurrence,
    reference_processed_by_at_least,
    reference_summary,
)
from moerouter.testing.reference.token_choice import reference_null_experts, reference_topk
from moerouter.testing.reference.transport import (
    reference_balanced_assignment,
    reference_sinkhorn_expert_choice,
    reference_sinkhorn_plan,
    reference_sinkhorn_token_choice,
    reference_sparsity_constrained_expert_choice,
)
from moerouter.testing.switching import use_backend

__all__ = [
    "ROUTER_ATOL",
    "ROUTER_RTOL",
    "Backend",
    "assert_close",
    "assert_plan_equal",
    "assert_plan_valid",
    "assert_routing_equal",
    "edge_case_logits",
    "reference_balanced_assignment",
    "reference_co_occurrence",
    "reference_combine",
    "reference_concatenated_load_balancing",
    "reference_dispatch",
    "reference_entropy",
    "reference_expert_choice",
    "reference_importance_loss",
    "reference_load_balancing",
    "reference_load_loss",
    "reference_make_plan",
    "reference_normal_cdf",
    "reference_null_experts",
    "reference_null_load_balancing",
    "reference_processed_by_at_least",
    "reference_sequence_load_balancing",
    "reference_sinkhorn_expert_choice",
    "reference_sinkhorn_plan",
    "reference_sinkhorn_token_choice",
    "reference_soft_combine",
    "reference_soft_dispatch",
    "reference_soft_moe",
    "reference_sparsity_constrained_expert_choice",
    "reference_summary",
    "reference_topk",
    "reference_z_loss",
    "to_numpy",
    "use_backend",
]
