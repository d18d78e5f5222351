"""The token-choice router kernel slot: scores, exact top-k choice, weights, finite rows.

``TopK``, ``NullExperts``, ``GShardTop2`` and ``DeepSeekTopK`` (without group limiting) route
through :func:`run_router` (:func:`policy_router`). It runs the array library's ``router``
kernel when its plugin registers one (and the kernel set it belongs to is on), and
:func:`reference_router`, written once against the array API, otherwise. Every kernel has one
signature::

    kernel(values, k, *, score, weights, num_real, bias[, eligible]) -> RouterResult | None

``values`` are the float32 logits ``(G, S, E')``, not cleaned: the kernel finds the non-finite
rows itself (one pass: a row is routable iff its maximum is finite). ``score`` is ``"softmax"``
or ``"sigmoid"``; ``weights`` one of :data:`WEIGHT_RULES`; columns ``>= num_real`` are null
experts (chosen, never routed); ``bias``, when given (a float32 ``(E',)`` array, or ``0.0``),
moves the selection from the logits to ``scores + bias`` (DeepSeek's selection on the scores,
with V3's selection-only bias; ``-inf`` logits stay unchosen). ``eligible``, passed only when
a policy limits the choice (``DeepSeekTopK``'s groups, always with a bias), is a function of the
selection ``(G, S, E')`` that returns it with every ineligible entry at ``-inf``; a kernel applies
it to its selection before choosing, or returns None (a kernel that does not take the keyword
is not asked). A kernel
returns None to hand a call it does not cover to the reference. Its result must equal the
reference's: the same ``choice`` and ``routed`` (ties to the lower column, slots best first),
``weights`` and ``probs`` within float32 rounding.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moerouter import _registry
from moerouter._agnostic.scores import masked_softmax, sigmoid, softmax, to_float32
from moerouter._agnostic.select import select_top_k
from moerouter._arrays import device_of
from moerouter._typing import Array, Namespace
from moerouter._validation import (
    CleanLogits,
    check_logits,
    check_token_layout_bounds,
    clean_logits,
    raise_if_unroutable,
)
from moerouter.policies._token_choice import renormalized_scores

__all__ = ["WEIGHT_RULES", "RouterResult", "policy_router", "reference_router", "run_router"]

#: ``"renormalize"``: the chosen scores over their routed sum (a softmax of log-scores over the
#: routed choices); ``"softmax_after_topk"``: a softmax of the routed chosen logits;
#: ``"raw"``: the chosen scores as they are.
WEIGHT_RULES = ("renormalize", "softmax_after_topk", "raw")


@dataclass(frozen=True)
class RouterResult:
    """What a router returns; every array is ``(G, S, ...)``, of the logits' backend and device.

    ``choice`` (k columns, best first, the backend's index dtype), ``routed`` (bool: a real
    expert with a finite logit in a finite row), ``weights`` (float32, the weight rule's, not yet
    zeroed where not routed), ``probs`` (float32 scores over all E' columns, zero on non-finite
    rows) and ``finite_rows`` (bool). ``probs`` is what the losses and ``Routing.probs`` use.
    ``all_routed``: the kernel found every choice routed (every row finite, no ``-inf`` and no
    null expert chosen), so the passes that mask with ``routed`` can be skipped.
    """

    choice: Array
    routed: Array
    weights: Array
    probs: Array
    finite_rows: Array
    xp: Namespace
    all_routed: bool = False

    @property
    def device(self) -> Any:
        """The logits' device."""
        return device_of(self.probs)


def scores_of(values: Array, score: str, *, xp: Namespace) -> Array:
    """Softmax or sigmoid scores of float32 logits."""
    return softmax(values, xp=xp) if score == "softmax" else sigmoid(values, xp=xp)


def biased_selection(values: Array, probs: Array, bias: Array | float, *, xp: Namespace) -> Array:
    """``probs + bias`` where the logit is above ``-inf``, ``-inf`` elsewhere (never chosen).

    A NaN sum (only from a NaN bias, which is refused when its values can be read, so under
    ``jax.jit`` or ``torch.compile``) is ``-inf`` too: that expert is never chosen, and the
    selection holds no NaN, so the top-k takes its NaN-free path (one ``lax.top_k`` on JAX
    rather than two).
    """
    lowest = xp.asarray(-xp.inf, dtype=xp.float32, device=device_of(values))
    biased = probs + bias
    return xp.where((values > -xp.inf) & (biased == biased), biased, lowest)


def chosen_weights(
    chosen_logits: Array,
    routed: Array | None,
    probs: Array,
    choice: Array,
    *,
    score: str,
    weights: str,
    xp: Namespace,
) -> Array:
    """The weight rule applied to the k chosen columns (shared by the reference and kernels).

    ``routed=None``: every choice is routed; the same values, without the masking passes.
    """
    if weights == "softmax_after_topk":
        return masked_softmax(chosen_logits, routed, xp=xp, device=device_of(chosen_logits))
    if weights == "renormalize":
        return renormalized_scores(chosen_logits, routed, score=score, xp=xp)
    return xp.take_along_axis(probs, choice, axis=-1)


def reference_router(
    clean: CleanLogits,
    k: int,
    *,
    score: str,
    weights: str,
    num_real: int,
    bias: Array | float | None = None,
    eligible: Callable[[Array], Array] | None = None,
) -> RouterResult:
    """The agnostic router on cleaned logits: the reference every kernel must equal."""
    xp, values = clean.xp, clean.values
    probs = scores_of(values, score, xp=xp)
    selection = values if bias is None else biased_selection(values, probs, bias, xp=xp)
    if eligible is not None:
        selection = eligible(selection)
    # Cleaned logits hold no NaN, and biased_selection turns a NaN sum into -inf.
    choice = select_top_k(selection, k, xp=xp, nan_free=True)
    chosen = xp.take_along_axis(selection, choice, axis=-1)
    chosen_logits = chosen if bias is None else xp.take_along_axis(values, choice, axis=-1)
    routed = (chosen > -xp.inf) & clean.finite_rows[..., None]
    if num_real < values.shape[-1]:
        routed = routed & (choice < num_real)
    return RouterResult(
        choice=choice,
        routed=routed,
        weights=chosen_weights(
            chosen_logits, routed, probs, choice, score=score, weights=weights, xp=xp
        ),
        probs=xp.where(clean.finite_rows[..., None], probs, xp.zeros_like(probs)),
        finite_rows=clean.finite_rows,
        xp=xp,
    )


@functools.cache
def _takes_eligible(kernel: Any) -> bool:
    """Whether a router kernel accepts the ``eligible`` keyword (read once per kernel)."""
    try:
        parameters = inspect.signature(kernel).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "eligible" or p.kind is p.VAR_KEYWORD for p in parameters)


def run_router(
    logits: Array,
    k: int,
    *,
    num_columns: int,
    columns_name: str,
    strict: bool,
    score: str = "softmax",
    weights: str = "renormalize",
    num_real: int | None = None,
    bias: Array | float | None = None,
    eligible: Callable[[Array], Array] | None = None,
) -> RouterResult:
    """Check ``logits`` (T, E') or (G, S, E') and route them through the router slot.

    ``bias`` must already be checked and float32 ``(E',)``, or ``0.0`` to select on the scores.
    ``eligible`` (with a bias only) masks the selection; kernels receive it only when given, and
    a kernel whose signature does not take it leaves those calls to the reference.
    ``strict=True`` raises on non-finite rows (concrete values only), as
    :func:`~moerouter._validation.clean_logits` does.
    """
    num_real = num_columns if num_real is None else num_real
    kernel = _registry.kernel_for("router", logits)
    if kernel is not None and (eligible is None or _takes_eligible(kernel)):
        xp = check_logits(logits, num_columns, columns_name=columns_name)
        values = logits if logits.dtype == xp.float32 else to_float32(logits, xp=xp)
        if values.ndim == 2:
            values = values[None, ...]
        limit = {} if eligible is None else {"eligible": eligible}
        result: RouterResult | None = kernel(
            values, k, score=score, weights=weights, num_real=num_real, bias=bias, **limit
        )
        if result is not None:
            if strict:
                raise_if_unroutable(logits, result.finite_rows, xp=xp)
            return result
    clean = clean_logits(logits, num_columns, columns_name=columns_name, strict=strict)
    return reference_router(
        clean, k, score=score, weights=weights, num_real=num_real, bias=bias, eligible=eligible
    )


def policy_router(
    policy: Any,
    logits: Array,
    k: int,
    capacity_factor: float | None,
    *,
    num_columns: int | None = None,
    columns_name: str = "num_experts",
    score: str = "softmax",
    weights: str = "renormalize",
    num_real: int | None = None,
    bias: Array | float | None = None,
) -> RouterResult:
    """The opening every routed token-choice policy shares: refuse shapes whose int32 indices
    would wrap (before anything is built), then :func:`run_router` with the policy's ``strict``.
    ``num_columns`` defaults to the policy's ``num_experts``. The result goes to
    :func:`~moerouter.policies._token_choice.route_token_choice` with ``probs_masked=True``."""
    check_token_layout_bounds(
        logits, k, num_experts=policy.num_experts, with_capacity=capacity_factor is not None
    )
    columns = policy.num_experts if num_columns is None else num_columns
    return run_router(
        logits,
        k,
        num_columns=columns,
        columns_name=columns_name,
        strict=policy.strict,
        score=score,
        weights=weights,
        num_real=num_real,
        bias=bias,
    )
