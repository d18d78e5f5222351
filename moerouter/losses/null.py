"""The null-aware form of load balancing: AdaMoE's :func:`null_load_balancing`."""

from __future__ import annotations

from typing import Literal

from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter.losses._shared import (
    Convention,
    Count,
)
from moerouter.losses.balancing import _balance
from moerouter.routing import Routing

__all__ = ["null_load_balancing"]


@fill_doc
def null_load_balancing(
    routing: Routing,
    *,
    null_mode: Literal["pooled", "per_expert"] = "pooled",
    convention: Convention = "megatron",
    mask: Array | None = None,
    count: Count = "top_k",
) -> Array:
    r"""AdaMoE's load-balancing loss over real and null experts (Zeng et al. 2024).

    - ``null_mode="pooled"`` (the official ``exp_1`` code and the authors' blog): the null
      experts' counts are replaced by their mean,
      :math:`c_j \leftarrow \frac{1}{m}\sum_{j' \in \mathrm{null}} c_{j'}`,
      so the nulls act as one averaged bucket and are not balanced against each other:
      :math:`L = E'[\sum_{i \in \mathrm{real}} f_i P_i + (F_{\mathrm{null}}/m) P_{\mathrm{null}}]`.
      With the default ``convention="megatron"`` this is exactly ``exp_1``'s loss.
    - ``null_mode="per_expert"``: every null column is an ordinary expert, which is what the
      official Mixtral run (``exp_2``) computed in effect; ``convention="mixtral"`` reproduces it.

    Parameters
    ----------
    routing : Routing
        Output of :class:`~moerouter.NullExperts` (any routing works; without null columns this is
        :func:`load_balancing`).
    null_mode : {"pooled", "per_expert"}
        How null experts are counted.
    convention : {"megatron", "mixtral", "gshard"}
        As in :func:`load_balancing`.
    %(mask)s
    count : {"top_k", "choices"}
        As in :func:`load_balancing`; the same for :class:`~moerouter.NullExperts` routings,
        which choose the top-k of their scores.

    Returns
    -------
    %(masked_scalar)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.NullExperts(num_experts=2, num_null=2, k=1)
    >>> routing = router(xp.asarray([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]))
    >>> round(float(mr.losses.null_load_balancing(routing)), 4)
    1.4134
    """
    if null_mode not in ("pooled", "per_expert"):
        raise ValueError(f"null_mode must be 'pooled' or 'per_expert', got {null_mode!r}")
    return _balance(
        routing, convention=convention, pool_null=null_mode == "pooled", mask=mask, count=count
    )
