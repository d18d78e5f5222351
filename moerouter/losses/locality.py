"""LocMoE's locality loss: how far each token's router distribution is from its own node's."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from moerouter._arrays import device_of
from moerouter._typing import Array
from moerouter._validation import check_positive_int, check_routing, is_array
from moerouter.routing import Routing

__all__ = ["locality_loss"]


def locality_loss(routing: Routing, token_nodes: Array, *, num_nodes: int, xp: Any = None) -> Array:
    r"""LocMoE's locality loss (UNVERIFIED form): :math:`\mathrm{KL}(p_{\text{local}} \| p)`.

    :math:`L = \frac{1}{T}\sum_t \sum_{e \in \text{node}(t)} \frac{1}{m}
    \big(\log\frac{1}{m} - \log p_{t,e}\big)`, ``m = E / N`` experts per node, averaged over
    tokens with finite logits (probabilities are clamped at the smallest normal float32 before
    the log). Zero when every token spreads its probability evenly over its own node. The form
    comes from a third-party implementation (``F.kl_div(router_probs.log(), local_dist)``); the
    paper's weight :math:`\mu` is not known and is left to the caller.

    Parameters
    ----------
    routing : Routing
        From any policy over ``E`` real experts (only ``probs`` and ``finite_rows`` are read).
    token_nodes : array (T,) int
        Node of each token.
    num_nodes : int
        ``N``; ``E`` must be a multiple.
    xp : namespace, optional
        Inferred from the routing.

    Returns
    -------
    array () float32

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=4, k=1)(xp.asarray([[2.0, 2.0, -50.0, -50.0]]))
    >>> round(float(mr.losses.locality_loss(routing, xp.asarray([0]), num_nodes=2)), 6)
    0.0
    """
    routing = check_routing(routing)
    xp = array_namespace(routing.probs) if xp is None else xp
    check_positive_int(num_nodes, "num_nodes")
    num_experts = routing.num_experts
    if num_experts % num_nodes:
        raise ValueError(f"num_experts = {num_experts} must be a multiple of num_nodes")
    if not is_array(token_nodes) or tuple(token_nodes.shape) != (routing.num_tokens,):
        raise ValueError(f"token_nodes must be an int array of shape ({routing.num_tokens},)")
    per_node = num_experts // num_nodes
    device = device_of(routing.probs)
    nodes = xp.astype(token_nodes, xp.int32)
    expert_node = xp.arange(num_experts, dtype=xp.int32, device=device) // per_node
    local = xp.astype(expert_node[None, :] == nodes[:, None], xp.float32) / per_node
    tiny = xp.asarray(xp.finfo(xp.float32).smallest_normal, dtype=xp.float32, device=device)
    log_p = xp.log(xp.maximum(routing.probs[:, :num_experts], tiny))
    log_local = xp.log(xp.asarray(1.0 / per_node, dtype=xp.float32, device=device))
    per_token = xp.sum(local * (log_local - log_p), axis=-1)
    finite = xp.astype(routing.finite_rows, xp.float32)
    count = xp.sum(finite)
    return xp.sum(per_token * finite) / xp.where(count > 0, count, xp.ones_like(count))
