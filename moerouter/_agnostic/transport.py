"""Optimal-transport building blocks of the Sinkhorn, BASE and sparsity-constrained routers.

Written once against the array API with static shapes: every loop runs a fixed number of times
(no convergence test), so the functions trace under ``jax.jit`` and ``torch.compile``. All of them
take float32 ``(G, S, E)`` arrays and treat the ``G`` groups independently.
"""

from __future__ import annotations

import math
from typing import Any

from moerouter._agnostic.scores import logsumexp
from moerouter._agnostic.select import descending_rank, position_in_bucket
from moerouter._typing import Array


def sinkhorn_potentials(
    scaled_logits: Array, row_active: Array, *, num_iters: int, xp: Any
) -> tuple[Array, Array]:
    r"""Log-domain Sinkhorn for the entropic transport of tokens onto experts.

    ``scaled_logits`` is :math:`L = \ell / \varepsilon` of shape (G, S, E) (entries may be -inf);
    ``row_active`` (G, S) bool marks the tokens taking part (inactive rows get marginal 0). The
    marginals are :math:`a_s = 1` per active token and :math:`b_e = n / E` per expert, with ``n``
    the active tokens of the group. Starting from :math:`u = 0`, each iteration sets

    .. math::

        v_e = \log b_e - \operatorname{LSE}_s (L_{se} + u_s), \qquad
        u_s = \log a_s - \operatorname{LSE}_e (L_{se} + v_e),

    as OTT's Sinkhorn does (column potential first), so the plan
    :math:`\Pi = \exp(L + u + v)` has exact row sums; its column sums converge to ``b``.

    Returns ``u`` (G, S, 1) and ``v`` (G, 1, E); ``u`` is -inf on inactive rows.
    """
    num_experts = scaled_logits.shape[-1]
    active = xp.astype(row_active, xp.float32)
    count = xp.sum(active, axis=-1, keepdims=True)[..., None]  # (G, 1, 1)
    # A group without active tokens gets b = 1/E: its potentials are never used.
    log_b = xp.log(xp.where(count > 0, count, xp.ones_like(count))) - math.log(num_experts)
    column = scaled_logits[..., :1]  # (G, S, 1) float32 on the logits' device
    log_a = xp.where(row_active[..., None], xp.zeros_like(column), xp.full_like(column, -xp.inf))
    u = xp.zeros_like(log_a)
    # (G, 1, E) zeros; a sum, not a [:, :1] slice, which is out of range with no tokens.
    v = xp.zeros_like(xp.sum(scaled_logits, axis=1, keepdims=True))
    for _ in range(num_iters):
        v = _update(log_b, logsumexp(scaled_logits + u, axis=1, xp=xp), xp=xp)
        u = _update(log_a, logsumexp(scaled_logits + v, axis=2, xp=xp), xp=xp)
    return u, v


def _update(log_marginal: Array, lse: Array, *, xp: Any) -> Array:
    # An expert (or token) no active partner can reach keeps potential 0 instead of inf - inf.
    reachable = lse > -xp.inf
    zero = xp.zeros_like(lse)
    return xp.where(reachable, log_marginal - xp.where(reachable, lse, zero), zero)


def balanced_rounds(
    log_plan: Array, row_active: Array, *, per_expert: int, num_rounds: int, xp: Any, device: Any
) -> Array:
    """Round a transport plan to a balanced integral assignment, one expert per token.

    Each round, every unassigned active token proposes to its best expert (largest ``log_plan``
    entry, ties to the lower expert) among those not yet full; each expert keeps the proposals with
    the largest entries (ties to the lower token) up to its remaining room of ``per_expert``. In a
    round that leaves a token unassigned, some expert fills up, so ``num_rounds = E`` rounds assign
    every active token whenever ``per_expert * E`` is at least the number of active tokens.

    Returns the expert of each token, (G, S) int32, -1 for inactive (or unassigned) tokens.
    """
    num_groups, group_size, num_experts = log_plan.shape
    int32 = xp.int32
    experts = xp.arange(num_experts, dtype=int32, device=device)
    assigned = xp.full((num_groups, group_size), -1, dtype=int32, device=device)
    lowest = xp.asarray(-xp.inf, dtype=log_plan.dtype, device=device)
    # Proposals of one group go to buckets g*(E+1) + e; non-proposers share bucket g*(E+1) + E.
    group_base = xp.arange(num_groups, dtype=int32, device=device)[:, None] * (num_experts + 1)
    for _ in range(num_rounds):
        load = xp.sum(xp.astype(assigned[..., None] == experts, int32), axis=1)  # (G, E)
        room = per_expert - load
        open_plan = xp.where((room > 0)[:, None, :], log_plan, lowest)
        # The backend's own index dtype (torch gathers with int64 only) for the gathers.
        best = xp.argsort(-open_plan, axis=-1, stable=True)[..., :1]
        choice = xp.astype(best[..., 0], int32)
        proposing = row_active & (assigned < 0) & xp.any(room > 0, axis=-1, keepdims=True)
        score = xp.take_along_axis(log_plan, best, axis=-1)[..., 0]
        # Serve proposals best-first; non-proposers (ranked last) never take room.
        score = xp.where(proposing, score, lowest)
        serve_order = xp.argsort(-score, axis=-1, stable=True)
        no_expert = xp.asarray(num_experts, dtype=int32, device=device)
        bucket = group_base + xp.where(proposing, choice, no_expert)
        served = xp.take_along_axis(bucket, serve_order, axis=-1)
        position = xp.reshape(
            position_in_bucket(xp.reshape(served, (-1,)), xp=xp, device=device), served.shape
        )
        position = xp.take_along_axis(
            position, xp.argsort(serve_order, axis=-1, stable=True), axis=-1
        )
        room_of_choice = xp.sum(
            xp.where(
                choice[..., None] == experts, room[:, None, :], xp.zeros_like(room[:, None, :])
            ),
            axis=-1,
        )
        accepted = proposing & (position < room_of_choice)
        assigned = xp.where(accepted, choice, assigned)
    return assigned


def sparse_simplex_projection(
    values: Array, max_nonzero: int, *, axis: int, xp: Any, device: Any
) -> Array:
    """Euclidean projection of each slice along ``axis`` onto ``{p in simplex : nnz(p) <= k}``.

    Keep the ``k`` largest entries (ties to the lower index) and project them onto the probability
    simplex (sort, cumulative sum, threshold ``theta``); every other entry is 0. This is JAXopt's
    ``projection_sparse_simplex``; with ``k`` equal to the slice length it is sparsemax.
    """
    moved = xp.moveaxis(values, axis, -1)
    keep = descending_rank(moved, axis=-1, xp=xp) < max_nonzero
    top = xp.sort(moved, axis=-1, descending=True)[..., :max_nonzero]
    cumulative = xp.cumulative_sum(top, axis=-1) - 1.0
    index = xp.arange(1, max_nonzero + 1, dtype=top.dtype, device=device)
    support = xp.sum(xp.astype(top - cumulative / index > 0, xp.int32), axis=-1, keepdims=True)
    # The largest entry is always in the support, so support >= 1; theta = cumulative[support - 1]
    # / support, read with a mask rather than a gather (torch gathers with int64 only). An array,
    # not the scalar 1: array-api-compat's scalar promotion calls torch.result_type, which
    # torch.compile(fullgraph=True) cannot trace.
    support = xp.astype(xp.maximum(support, xp.ones_like(support)), top.dtype)
    at_support = xp.where(index == support, cumulative, xp.zeros_like(cumulative))
    theta = xp.sum(at_support, axis=-1, keepdims=True) / support
    zero = xp.zeros_like(moved)
    projected = xp.where(keep, xp.maximum(moved - theta, zero), zero)
    return xp.moveaxis(projected, -1, axis)


def sparse_transport_plan(
    similarity: Array,
    max_nonzero: int,
    *,
    gamma: float,
    num_steps: int,
    learning_rate: float,
    xp: Any,
    device: Any,
) -> Array:
    r"""Sparsity-constrained optimal transport (Liu, Puigcerver, Blondel, ICLR 2023), semi-dual.

    Tokens (rows, marginal :math:`a = 1`) are transported onto experts (columns, marginal
    :math:`b = S/E`) with cost :math:`-\mathrm{sim}`, a squared-ℓ2 regulariser of strength
    :math:`\gamma` and at most ``max_nonzero`` tokens per expert column. The semi-dual objective in
    the token potential :math:`\alpha` is

    .. math::

        \max_\alpha\ \langle \alpha, a \rangle - \sum_e \max\nolimits_{\ell_2, k}
        (\alpha + \mathrm{sim}_{:,e};\ b_e),

    whose gradient is :math:`a - \sum_e p_e`, with
    :math:`p_e = \mathrm{proj}_k((\alpha + \mathrm{sim}_{:,e}) / (\gamma b_e))` the k-sparse simplex
    projection. It is maximised with ``num_steps`` Adam steps (optax defaults
    :math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-8}`) from :math:`\alpha = 0`, as vmoe's
    ``KSparseProjectionTransportTopItemsPerExpertRouter`` does; the plan is :math:`b_e p_e`.

    ``similarity`` is (G, S, E); returns the plan (G, S, E).
    """
    group_size, num_experts = similarity.shape[-2], similarity.shape[-1]
    marginal_b = group_size / num_experts
    scale = gamma * marginal_b
    alpha = xp.zeros_like(similarity[..., :1])  # (G, S, 1)
    first = xp.zeros_like(alpha)
    second = xp.zeros_like(alpha)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, num_steps + 1):
        columns = sparse_simplex_projection(
            (alpha + similarity) / scale, max_nonzero, axis=1, xp=xp, device=device
        )
        # Gradient of the negated semi-dual (the loss Adam minimises): sum_e p_e - a.
        grad = xp.sum(columns, axis=-1, keepdims=True) - 1.0
        first = beta1 * first + (1.0 - beta1) * grad
        second = beta2 * second + (1.0 - beta2) * grad * grad
        first_hat = first / (1.0 - beta1**step)
        second_hat = second / (1.0 - beta2**step)
        alpha = alpha - learning_rate * first_hat / (xp.sqrt(second_hat) + eps)
    columns = sparse_simplex_projection(
        (alpha + similarity) / scale, max_nonzero, axis=1, xp=xp, device=device
    )
    return marginal_b * columns
