"""Soft MoE: every slot is a weighted average of tokens (Puigcerver et al., ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from moerouter._agnostic.scores import masked_softmax
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import check_fields, check_positive_int, clean_logits
from moerouter.routing import SoftRouting

__all__ = ["SoftMoE"]


@fill_doc
@PolicyCapabilities(scores=("softmax",), capacity="exact")
@dataclass(frozen=True)
class SoftMoE:
    r"""Soft mixture of experts (Puigcerver, Riquelme, Mustafa, Houlsby, "From Sparse to Soft
    Mixtures of Experts", ICLR 2024, arXiv 2308.00951).

    The logits :math:`\ell \in \mathbb{R}^{S \times N}` of a group have one column per slot,
    :math:`N = E \cdot P` (``P = slots_per_expert``), expert-major: slot :math:`n` belongs to
    expert :math:`\lfloor n / P \rfloor`. Dispatch weights normalise over the tokens of a slot,
    combine weights over the slots of a token:

    .. math::

        D_{s,n} = \frac{e^{\ell_{s,n}}}{\sum_{s'} e^{\ell_{s',n}}}, \qquad
        W_{s,n} = \frac{e^{\ell_{s,n}}}{\sum_{n'} e^{\ell_{s,n'}}}, \qquad
        \tilde{x}_n = \sum_s D_{s,n} x_s, \qquad
        y_s = \sum_n W_{s,n} \, f_{\lfloor n/P \rfloor}(\tilde{x}_n).

    :func:`moerouter.dispatch` and :func:`moerouter.combine` take the returned
    :class:`~moerouter.SoftRouting`. No token is dropped, every expert gets exactly ``P`` slots
    per group, and everything is differentiable; but each slot mixes all tokens of its group, so
    Soft MoE is not causal (do not use it in an autoregressive decoder). The paper's gate is
    :math:`\ell = \mathrm{scale} \cdot \hat{X} \hat{\Phi}` with L2-normalised tokens and slot
    parameters (vmoe ``SoftRouter``); compute it yourself and hand the logits here. vmoe's
    default ``P = round(S / E)`` (capacity factor 1) gives as many slots as tokens.

    A non-finite logits row (NaN, +inf, or only -inf) feeds no slot and reads nothing back (its
    output is zero); a -inf entry excludes that (token, slot) pair from both softmaxes.

    Parameters
    ----------
    num_experts : int
        ``E``.
    slots_per_expert : int
        ``P``; the logits' last dimension is ``E * P``.
    %(strict)s

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.SoftMoE(num_experts=2, slots_per_expert=1)
    >>> soft = router(xp.asarray([[0.0, 0.0], [0.0, 0.0]]))
    >>> soft.dispatch_weights
    Array([[0.5, 0.5],
           [0.5, 0.5]], dtype=array_api_strict.float32)
    >>> x = xp.asarray([[1.0], [3.0]], dtype=xp.float32)
    >>> mr.dispatch(x, soft)  # each slot averages the two tokens
    Array([[2.],
           [2.]], dtype=array_api_strict.float32)
    """

    num_experts: int
    slots_per_expert: int = 1
    strict: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        check_positive_int(self.slots_per_expert, "slots_per_expert")

    @property
    def num_slots(self) -> int:
        """``N = E * P``, the logits' last dimension and the rows :func:`dispatch` returns."""
        return self.num_experts * self.slots_per_expert

    def __call__(self, logits: Array) -> SoftRouting:
        """Soft-route ``logits`` of shape (T, E * P) or (G, S, E * P)."""
        clean = clean_logits(
            logits,
            self.num_slots,
            columns_name="num_experts * slots_per_expert",
            strict=self.strict,
        )
        xp = clean.xp
        values = clean.values  # (G, S, N)
        usable = clean.finite_rows[..., None] & (values > -xp.inf)
        device = clean.device
        combine_weights = masked_softmax(values, usable, xp=xp, device=device)
        by_slot = xp.permute_dims(values, (0, 2, 1))
        dispatch_weights = xp.permute_dims(
            masked_softmax(by_slot, xp.permute_dims(usable, (0, 2, 1)), xp=xp, device=device),
            (0, 2, 1),
        )
        if logits.ndim == 2:
            dispatch_weights, combine_weights = dispatch_weights[0, ...], combine_weights[0, ...]
        return SoftRouting(
            dispatch_weights=dispatch_weights,
            combine_weights=combine_weights,
            finite_rows=xp.reshape(clean.finite_rows, (-1,)),
            num_experts=self.num_experts,
            slots_per_expert=self.slots_per_expert,
            num_groups=clean.num_groups,
        )
