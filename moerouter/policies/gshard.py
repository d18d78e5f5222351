"""GShard top-2 gating with its random second expert (Lepikhin et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moerouter._agnostic.scores import renormalize
from moerouter._capabilities import PolicyCapabilities
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
    check_fields,
    check_positive_float,
    check_positive_int,
    same_backend,
)
from moerouter.policies._common import check_capacity_options
from moerouter.policies._router import policy_router
from moerouter.policies._token_choice import (
    DROP_POLICIES,
    call_capacity_factor,
    route_token_choice,
)
from moerouter.routing import Routing

__all__ = ["GShardTop2"]


@PolicyCapabilities(scores=("softmax",), capacity="optional", causal=True)
@dataclass(frozen=True)
class GShardTop2:
    r"""GShard top-2 gating: the second expert is kept at random, in proportion to its gate.

    With :math:`g = \mathrm{softmax}(\ell)`, a token's first expert is :math:`e_1 = \arg\max g`
    and its second :math:`e_2` the best of the others (ties to the lower index). With
    ``normalize=True`` (lingvo's ``legacy_mtf_behavior``) the two gates are renormalised,
    :math:`\hat g_i = g_i / (g_1 + g_2)`, and are *not* renormalised again when a choice is
    dropped. With ``second_expert_policy="random"`` the second expert is kept iff

    .. math::

        u < \hat g_2 / \tau, \qquad u \sim U[0, 1), \quad
        \tau = \texttt{second\_expert\_threshold}

    — the rule of ``tensorflow/lingvo`` ``gshard_utils.top2_gating_on_logits`` (with
    ``normalize=False`` it uses the raw :math:`g_2`, as lingvo does without the legacy flag).
    :math:`\tau = 0.5` gives GShard's Algorithm 1, "dispatch to :math:`e_2` if
    :math:`2 \hat g_2 > u`" [UNVERIFIED against the paper text]; a gate at or above
    :math:`\tau` always keeps its expert. A dropped second choice is expert -1 with weight 0 and
    takes no capacity. Capacity (``capacity_factor``: :math:`C = \lceil cf \cdot S \cdot 2 / E
    \rceil`, GShard's :math:`2N/E` at cf = 1) is k-major as in :class:`TopK`: all first choices
    are served before any second choice.

    The decision compares a computed gate with the caller's uniform draw, so a draw within
    float32 rounding of :math:`\hat g_2 / \tau` may keep the expert on one backend and not on
    another; ties inside a row (equal logits) are exact.

    Parameters
    ----------
    num_experts : int
        ``E`` >= 2.
    second_expert_policy : {"random", "all"}
        "all" keeps every second expert (plain top-2; no ``uniform`` needed).
    second_expert_threshold : float
        ``tau`` > 0.
    normalize : bool
        Renormalise the two gates (legacy MTF behaviour) before the random decision.
    capacity_factor, capacity_multiple_of, min_capacity, drop_policy, strict
        As in :class:`TopK`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.GShardTop2(num_experts=3)
    >>> logits = xp.asarray([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    >>> router(logits, xp.asarray([0.1, 0.9])).expert_ids  # 2 * g2 / (g1 + g2) = 0.54
    Array([ 0,  1,  0, -1], dtype=array_api_strict.int32)
    """

    num_experts: int
    second_expert_policy: Literal["random", "all"] = "random"
    second_expert_threshold: float = 0.5
    normalize: bool = True
    capacity_factor: float | None = None
    capacity_multiple_of: int = 1
    min_capacity: int = 0
    drop_policy: Literal["position", "probs", "batch_priority"] = "position"
    strict: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts", minimum=2)
        check_choice(self.second_expert_policy, "second_expert_policy", ("random", "all"))
        threshold = self.second_expert_threshold
        check_positive_float(threshold, "second_expert_threshold")
        check_capacity_options(self, DROP_POLICIES)

    def __call__(
        self,
        logits: Array,
        uniform: Array | None = None,
        *,
        capacity_factor: float | None = None,
    ) -> Routing:
        """Route ``logits`` (T, E) or (G, S, E); ``uniform`` (T,) or (G, S) draws on [0, 1).

        ``capacity_factor``, when given, replaces the constructor's value for this call.
        """
        capacity_factor = call_capacity_factor(self, capacity_factor)
        decision = policy_router(self, logits, 2, capacity_factor, weights="raw")
        xp, routed = decision.xp, decision.routed
        num_groups, group_size = (int(size) for size in decision.finite_rows.shape)
        # lingvo renormalises the two gates g_i / (g_1 + g_2), not in log space.
        weights = (
            renormalize(decision.weights, routed, xp=xp)
            if self.normalize
            else xp.where(routed, decision.weights, xp.zeros_like(decision.weights))
        )
        if self.second_expert_policy == "random":
            draws = self._check_uniform(uniform, logits, num_groups, group_size)
            keep_second = draws < weights[..., 1] / self.second_expert_threshold
            routed = routed & xp.stack([xp.ones_like(keep_second), keep_second], axis=-1)
            weights = xp.where(routed, weights, xp.zeros_like(weights))
        elif uniform is not None:
            raise ValueError('uniform is only used with second_expert_policy="random"')
        return route_token_choice(
            self,
            decision,
            decision.probs,
            decision.choice,
            routed,
            weights,
            capacity_factor=capacity_factor,
            probs_masked=True,
            # The random policy drops second choices: routed is no longer the router's.
            all_routed=decision.all_routed and self.second_expert_policy != "random",
        )

    def _check_uniform(
        self, given: Array | None, logits: Array, num_groups: int, group_size: int
    ) -> Array:
        if given is None:
            raise ValueError(
                'second_expert_policy="random" needs uniform: one U[0, 1) draw per token'
            )
        uniform: Array = given
        xp = same_backend(("uniform", uniform), ("logits", logits))
        if tuple(uniform.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"uniform must have shape {tuple(logits.shape[:-1])} (one draw per token), "
                f"got {tuple(uniform.shape)}"
            )
        if not xp.isdtype(uniform.dtype, "real floating"):
            raise TypeError(f"uniform must be a real floating dtype, got {uniform.dtype}")
        return xp.reshape(xp.astype(uniform, xp.float32), (num_groups, group_size))
