r"""Converting a softmax top-k router to AdaMoE's null experts and back (Zeng et al. 2024).

The official AdaMoE code starts each null gate row as a copy of a real row
(``gate2.weight = tile(gate.weight)``): null row ``j`` copies real row ``j mod E``. With
``m = (c - 1) E`` null experts every real logit then appears ``c`` times, the real column first,
and since moerouter breaks ties towards the lower column a token takes its best real expert, its
``c - 1`` copies, its second real expert, and so on. Its real choices are exactly its top-``k``
real experts, weighted by the softmax over their logits as :class:`moerouter.TopK` with
``normalize=True`` weights them, whenever

.. math::

    (k - 1)\,c < k' \le k\,c, \qquad c = 1 + m / E,

so a converted layer computes what the top-k layer computed, bit for bit, and fine-tuning starts
from the trained model. :func:`null_router` refuses any other ``k'``, and an ``m`` that ``E``
does not divide (the number of real experts would then depend on the token).

The layers use these helpers: ``moerouter_torch.MoE.to_adamoe`` / ``from_adamoe``,
``moerouter_jax.layer.to_adamoe`` / ``from_adamoe`` and the NNX ``MoE``'s methods. Nothing here
imports a framework: :func:`tile_null_rows` and :func:`drop_null_rows` work on any array-API
array.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device

from moerouter._numerics import check_array
from moerouter.policies import NullExperts, TopK
from moerouter.policies._common import check_positive_int

__all__ = ["drop_null_rows", "exact_k_range", "null_router", "tile_null_rows", "top_k_router"]

Array = Any


def exact_k_range(k: int, num_experts: int, num_null: int) -> tuple[int, int]:
    """The ``k'`` for which the converted router picks exactly the top-``k`` real experts.

    Returns ``(lowest, highest)``, both included: ``((k - 1) c + 1, k c)`` with
    ``c = 1 + num_null / num_experts``.

    Raises
    ------
    ValueError
        Naming ``num_null`` when ``num_experts`` does not divide it.
    """
    check_positive_int(num_experts, "num_experts")
    check_positive_int(num_null, "num_null", minimum=0)
    check_positive_int(k, "k")
    if num_null % num_experts:
        raise ValueError(
            f"num_null must be a multiple of num_experts = {num_experts} for an exact conversion "
            f"(every real row tiled equally often), got {num_null}"
        )
    copies = 1 + num_null // num_experts
    return (k - 1) * copies + 1, k * copies


def null_router(router: Any, *, num_null: int, k: int) -> NullExperts:
    """The :class:`moerouter.NullExperts` router that a converted ``router`` becomes.

    Parameters
    ----------
    router : moerouter.TopK
        Softmax scores, ``normalize=True`` (AdaMoE renormalises the real experts' weights), no
        capacity, no ``softmax_after_topk``: the routers whose output a conversion preserves.
    num_null : int
        Null experts ``m``, a multiple of ``router.num_experts``.
    k : int
        Choices per token over real and null experts, ``k'``, in :func:`exact_k_range`
        (4 for Mixtral's top-2 with ``m = 8`` or ``16`` and ``E = 8``).

    Returns
    -------
    moerouter.NullExperts

    Raises
    ------
    TypeError
        Naming ``router`` when it is not a :class:`moerouter.TopK`.
    ValueError
        Naming ``router``, ``num_null`` or ``k`` when the conversion would change the output.
    """
    if not isinstance(router, TopK):
        raise TypeError(
            f"router must be a moerouter.TopK to convert to null experts, got {router!r}"
        )
    unsupported = {
        "score": router.score != "softmax",
        "normalize": not router.normalize,
        "softmax_after_topk": router.softmax_after_topk,
        "capacity_factor": router.capacity_factor is not None,
    }
    wrong = [name for name, bad in unsupported.items() if bad]
    if wrong:
        raise ValueError(
            "router must be a softmax TopK with normalize=True, no capacity and no "
            f"softmax_after_topk for the conversion to keep its output; {router!r} has "
            f"{', '.join(wrong)}"
        )
    check_positive_int(k, "k")
    if k < router.k:
        raise ValueError(f"k must be >= the top-k router's k = {router.k}, got {k}")
    lowest, highest = exact_k_range(router.k, router.num_experts, num_null)
    if not lowest <= k <= highest:
        raise ValueError(
            f"k must be in [{lowest}, {highest}] so that a token keeps exactly its top-"
            f"{router.k} real experts with num_null = {num_null} tiled rows, got {k}"
        )
    return NullExperts(router.num_experts, num_null=num_null, k=k, strict=router.strict)


def top_k_router(router: Any, *, k: int) -> TopK:
    """The :class:`moerouter.TopK` (softmax, renormalised) that a null-expert ``router`` returns to.

    Raises
    ------
    TypeError
        Naming ``router`` when it is not a :class:`moerouter.NullExperts`.
    ValueError
        Naming ``k`` when it is not in ``[1, router.num_experts]``.
    """
    if not isinstance(router, NullExperts):
        raise TypeError(f"router must be a moerouter.NullExperts to convert back, got {router!r}")
    return TopK(router.num_experts, k=k, strict=router.strict)


def _check_axis(weight: Array, axis: int) -> int:
    check_array(weight, "weight")
    if not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"axis must be in [{-weight.ndim}, {weight.ndim}), got {axis}")
    return int(axis % weight.ndim)


def tile_null_rows(weight: Array, num_null: int, *, axis: int = 0) -> Array:
    """``weight`` with ``num_null`` rows appended along ``axis``, row ``E + j`` a copy of row
    ``j mod E`` (``E = weight.shape[axis]``), on ``weight``'s device and in its dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from moerouter.adamoe import tile_null_rows
    >>> tile_null_rows(np.array([[1.0], [2.0]]), 3)[:, 0].tolist()
    [1.0, 2.0, 1.0, 2.0, 1.0]
    """
    axis = _check_axis(weight, axis)
    check_positive_int(num_null, "num_null", minimum=0)
    real = weight.shape[axis]
    if real == 0:
        raise ValueError(f"weight has no rows along axis {axis} to tile")
    xp = array_namespace(weight)
    rows = xp.arange(num_null, device=device(weight)) % real
    return xp.concat([weight, xp.take(weight, rows, axis=axis)], axis=axis)


def drop_null_rows(weight: Array, num_experts: int, *, axis: int = 0) -> Array:
    """The first ``num_experts`` rows of ``weight`` along ``axis``: undoes the tiling."""
    axis = _check_axis(weight, axis)
    check_positive_int(num_experts, "num_experts")
    if num_experts > weight.shape[axis]:
        raise ValueError(
            f"num_experts must be <= the {weight.shape[axis]} rows of weight, got {num_experts}"
        )
    index = tuple(
        slice(0, num_experts) if dim == axis else slice(None) for dim in range(weight.ndim)
    )
    return weight[index]
