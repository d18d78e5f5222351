r"""LocMoE and LocMoE+: locality-aware routing and affinity-based token rearrangement.

Li et al., "LocMoE: A Low-Overhead MoE for Large Language Model Training" (IJCAI 2024,
arXiv 2401.13920) and "LocMoE+: Enhanced Router with Token Feature Awareness for Efficient LLM
Pre-Training" (arXiv 2406.00023). No code was released and the paper bodies could not be read:
only the abstracts are verified. What is here, and how sure it is:

* :class:`LocalityTopK` (the abstract's "converting partial inter-node communication to that of
  intra-node", made concrete as node-limited routing): experts live on ``N`` nodes in contiguous
  blocks (expert parallelism's layout); a token may use only its own node plus the
  ``max_nodes - 1`` other nodes with the highest scores, ranked as DeepSeek-V3's group-limited
  routing ranks groups (sum of the top-2 probabilities in the group). ``max_nodes=1`` keeps every
  token on its own node. This is a design, not the paper's exact rule.
* :func:`~moerouter.losses.locality_loss` (in :mod:`moerouter.losses`, importable from here
  too): :math:`\mathrm{KL}(p_{\text{local}} \,\|\, p)` with
  :math:`p_{\text{local}}` uniform over the token's node, from a third-party implementation;
  UNVERIFIED.
* :func:`~moerouter.gates.grouped_average_pooling` (a gate, in :mod:`moerouter.gates.locality`,
  importable from here too): the parameter-free GrAP gate, :math:`h_e(x) = (E/d)
  \sum_{j \in \text{block } e} x_j`, from a third-party implementation; UNVERIFIED.
* :func:`~moerouter.gates.affinity_scores` (in :mod:`moerouter.gates.locality` too) and
  :class:`AffinityRouting` (LocMoE+): affinity
  :math:`\delta_{t,i} = \cos(x_t, w_i)`; a token goes to its top-1 expert only if it is among
  that expert's ``C`` highest-affinity tokens (token choice, then expert choice). From a
  third-party implementation; UNVERIFIED.
* Not implemented: LocMoE's lower bound on expert capacity ("calculated through the maximal
  angular deviation between the gating weights of the experts and the assigned tokens") and
  LocMoE+'s re-estimated bound. The abstracts state that the bounds exist but not the formulas,
  and no source gives them, so the capacity here is the usual
  :math:`C = \lceil \mathrm{cf} \cdot S / E \rceil`, chosen by the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moerouter._agnostic.scores import masked_softmax, softmax
from moerouter._agnostic.select import descending_rank, top_k
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    CleanLogits,
    check_fields,
    check_positive_int,
    check_token_layout_bounds,
    clean_logits,
    is_array,
)
from moerouter.gates.locality import affinity_scores, grouped_average_pooling
from moerouter.losses.locality import locality_loss
from moerouter.policies._common import (
    capacity,
    check_capacity_options,
    check_capacity_policy_fields,
    drop_over_capacity,
)
from moerouter.policies._token_choice import (
    choose,
    clean_token_choice_logits,
    route_token_choice,
    token_choice_routing,
)
from moerouter.routing import Routing

__all__ = [
    "AffinityRouting",
    "LocalityTopK",
    "affinity_scores",
    "grouped_average_pooling",
    "locality_loss",
]


def _grouped_nodes(token_nodes: Array, clean: CleanLogits, num_nodes: int) -> Array:
    xp = clean.xp
    if not is_array(token_nodes):
        raise TypeError(f"token_nodes must be an array, got {type(token_nodes).__name__}")
    num_tokens = clean.num_groups * clean.group_size
    if token_nodes.ndim != 1 or token_nodes.shape[0] != num_tokens:
        raise ValueError(
            f"token_nodes must have shape ({num_tokens},), got {tuple(token_nodes.shape)}"
        )
    if not xp.isdtype(token_nodes.dtype, "integral"):
        raise TypeError(f"token_nodes must be integers, got {token_nodes.dtype}")
    # Values are not checked (that would sync with the device on every call); a node outside
    # [0, N) simply forces no node, and the token takes the max_nodes best nodes by score.
    nodes = xp.astype(token_nodes, xp.int32)
    return xp.reshape(nodes, (clean.num_groups, clean.group_size))


@PolicyCapabilities(scores=("softmax",), capacity="optional", expert_groups=True, causal=True)
@dataclass(frozen=True)
class LocalityTopK:
    r"""Top-k routing limited to the token's own node and a few others (LocMoE-style locality).

    Experts ``[m E/N, (m+1) E/N)`` live on node ``m``. For a token on node :math:`n_t` with
    probabilities :math:`p = \mathrm{softmax}(\ell)`, node :math:`m` scores
    :math:`s_m = \sum \mathrm{top}_2(p_{\text{node } m})` (top-1 when a node holds one expert);
    the token keeps its own node and the ``max_nodes - 1`` other nodes with the largest
    :math:`s_m` (ties to the lower node), then picks its top-k experts among the kept nodes'
    experts. Weights are the selected probabilities, renormalised over the k chosen when
    ``normalize`` (a softmax of their logits). ``probs`` in the routing are the unmasked
    :math:`p`, so the balancing losses see the router's real distribution.

    Node ranking mirrors DeepSeek-V3's group-limited routing; always keeping the own node is the
    locality preference. The exact LocMoE rule is UNVERIFIED (see the module docstring).

    Parameters
    ----------
    num_experts : int
        ``E``, a multiple of ``num_nodes``.
    k : int
        Experts per token, ``k <= max_nodes * E / N``.
    num_nodes : int
        ``N``.
    max_nodes : int
        Nodes a token may use, its own included (1: purely local).
    normalize : bool
        Renormalise the k weights to sum to 1.
    capacity_factor, capacity_multiple_of, drop_policy, strict
        As in :class:`moerouter.TopK`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.policies.LocalityTopK(num_experts=4, k=1, num_nodes=2)
    >>> logits = xp.asarray([[0.0, 1.0, 5.0, 0.0], [0.0, 1.0, 5.0, 0.0]])
    >>> router(logits, xp.asarray([0, 1])).expert_ids    # token 0 must stay on node 0
    Array([1, 2], dtype=array_api_strict.int32)
    """

    num_experts: int
    k: int
    num_nodes: int
    max_nodes: int = 1
    normalize: bool = True
    capacity_factor: float | None = None
    capacity_multiple_of: int = 1
    drop_policy: Literal["position", "probs"] = "position"
    strict: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        check_positive_int(self.k, "k")
        check_positive_int(self.num_nodes, "num_nodes")
        check_positive_int(self.max_nodes, "max_nodes")
        if self.num_experts % self.num_nodes:
            raise ValueError(
                f"num_experts = {self.num_experts} must be a multiple of "
                f"num_nodes = {self.num_nodes}"
            )
        if self.max_nodes > self.num_nodes:
            raise ValueError(f"max_nodes must be <= num_nodes = {self.num_nodes}")
        reachable = self.max_nodes * (self.num_experts // self.num_nodes)
        if self.k > reachable:
            raise ValueError(
                f"k must be <= max_nodes * experts per node = {reachable}, got {self.k}"
            )
        check_capacity_options(self, ("position", "probs"))

    def __call__(self, logits: Array, token_nodes: Array) -> Routing:
        """Route ``logits`` (T, E) or (G, S, E) of tokens on nodes ``token_nodes`` (T,).

        ``token_nodes`` holds node ids in ``[0, N)``; they are not checked on the device, and an
        id outside that range forces no node (the token takes the best ``max_nodes`` nodes).
        """
        clean = clean_token_choice_logits(self, logits, self.k, self.capacity_factor)
        xp, device = clean.xp, clean.device
        nodes = _grouped_nodes(token_nodes, clean, self.num_nodes)
        probs = softmax(clean.values, xp=xp)
        per_node = self.num_experts // self.num_nodes
        by_node = xp.reshape(probs, (*probs.shape[:-1], self.num_nodes, per_node))
        best_first = -xp.sort(-by_node, axis=-1)
        node_score = xp.sum(best_first[..., : min(2, per_node)], axis=-1)  # (G, S, N)
        node_index = xp.arange(self.num_nodes, dtype=xp.int32, device=device)
        own = node_index == nodes[..., None]
        highest = xp.asarray(xp.inf, dtype=node_score.dtype, device=device)
        node_score = xp.where(own, highest, node_score)
        kept_nodes = top_k(node_score, self.max_nodes, xp=xp)  # (G, S, max_nodes)
        keep_node = xp.any(
            kept_nodes[..., None] == xp.astype(node_index, kept_nodes.dtype), axis=-2
        )
        keep = xp.reshape(
            xp.broadcast_to(keep_node[..., None], (*keep_node.shape, per_node)), probs.shape
        )
        lowest = xp.asarray(-xp.inf, dtype=clean.values.dtype, device=device)
        masked = CleanLogits(
            xp.where(keep, clean.values, lowest),
            clean.finite_rows,
            clean.num_groups,
            clean.group_size,
            xp,
        )
        choice, chosen_logits = choose(masked, self.k)
        routed = (chosen_logits > -xp.inf) & clean.finite_rows[..., None]
        if self.normalize:
            weights = masked_softmax(chosen_logits, routed, xp=xp, device=device)
        else:
            weights = xp.take_along_axis(probs, choice, axis=-1)
        return route_token_choice(
            self, clean, probs, choice, routed, weights, capacity_factor=self.capacity_factor
        )


@fill_doc
@PolicyCapabilities(scores=("softmax",), capacity="always")
@dataclass(frozen=True)
class AffinityRouting:
    r"""LocMoE+'s affinity-based rearrangement (UNVERIFIED): top-1, then experts keep top-C.

    Each token picks its top-1 expert from the logits; each expert then keeps, among the tokens
    of a group that picked it, the :math:`C = \lceil \mathrm{cf} \cdot S / E \rceil` with the
    highest affinity (ties to the lower token index), and the rest are dropped (expert -1,
    weight 0). The weight of a kept token is its router probability :math:`p_{t,i}` (Switch
    style). Affinities are usually :func:`affinity_scores`; without them the probabilities rank
    the tokens, which is ``TopK(k=1, capacity_factor=cf, drop_policy="probs")``. LocMoE+ adapts
    ``C`` during training from its capacity bound, which is not known (module docstring).

    Affinity ranks tokens against each other, so as with expert choice, decisions are identical
    across backends for inputs without float32 near-ties between tokens.

    Parameters
    ----------
    num_experts : int
        ``E``.
    capacity_factor : float
        ``cf`` > 0.
    capacity_multiple_of : int
        Round ``C`` up to a multiple of this.
    %(strict)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.policies.AffinityRouting(num_experts=2, capacity_factor=1.0)
    >>> logits = xp.asarray([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    >>> affinity = xp.asarray([[0.9, 0.1], [0.95, 0.0], [0.2, 0.1], [0.0, 0.5]])
    >>> router(logits, affinity).expert_ids      # C = 2: token 2 has the lowest affinity
    Array([ 0,  0, -1,  1], dtype=array_api_strict.int32)
    """

    num_experts: int
    capacity_factor: float
    capacity_multiple_of: int = 1
    strict: bool = False

    def __post_init__(self) -> None:
        check_capacity_policy_fields(self)

    def __call__(self, logits: Array, affinity: Array | None = None) -> Routing:
        """Route ``logits`` (T, E) or (G, S, E), ranking tokens by ``affinity`` (same shape)."""
        check_token_layout_bounds(logits, 1, num_experts=self.num_experts, with_capacity=True)
        clean = clean_logits(
            logits, self.num_experts, columns_name="num_experts", strict=self.strict
        )
        xp, device = clean.xp, clean.device
        probs = softmax(clean.values, xp=xp)
        choice, chosen_logits = choose(clean, 1)
        routed = (chosen_logits > -xp.inf) & clean.finite_rows[..., None]
        if affinity is None:
            scores = probs
        else:
            if not is_array(affinity) or tuple(affinity.shape) != tuple(logits.shape):
                raise ValueError(
                    f"affinity must be an array of the logits' shape {tuple(logits.shape)}"
                )
            scores = xp.astype(xp.reshape(affinity, probs.shape), xp.float32)
        chosen_scores = xp.take_along_axis(scores, choice, axis=-1)  # (G, S, 1)
        # Unroutable tokens rank last so they never take a slot from a real one.
        lowest = xp.asarray(-xp.inf, dtype=xp.float32, device=device)
        chosen_scores = xp.where(routed, chosen_scores, lowest)
        priority = xp.astype(descending_rank(chosen_scores, axis=1, xp=xp), xp.int32)
        per_expert = capacity(
            self.capacity_factor, clean.group_size, 1, self.num_experts, self.capacity_multiple_of
        )
        no_expert = xp.asarray(-1, dtype=xp.int32, device=device)
        expert_ids = xp.where(routed, xp.astype(choice, xp.int32), no_expert)
        kept = drop_over_capacity(
            expert_ids[..., 0],
            priority[..., 0],
            num_experts=self.num_experts,
            capacity=per_expert,
            xp=xp,
            device=device,
        )
        routed = routed & (kept >= 0)[..., None]
        weights = xp.take_along_axis(probs, choice, axis=-1)
        weights = xp.where(routed, weights, xp.zeros_like(weights))
        return token_choice_routing(
            clean,
            probs,
            choice,
            routed,
            weights,
            num_experts=self.num_experts,
        )
