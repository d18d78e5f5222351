r"""Balancing losses, each a pure function of a :class:`~moerouter.Routing` (or of logits).

Notation: :math:`E'` router columns (real plus null experts), :math:`T` valid tokens (finite
logits and, when a ``mask`` is given, not padding), :math:`c_e` the number of choices of column
:math:`e` (before capacity drops; by default the times :math:`e` is among a token's top-k router
scores, as Megatron-Core and transformers count, see :func:`load_balancing`'s ``count``),
:math:`\hat p_{t,e} = p_{t,e} / \sum_j p_{t,j}` the router scores normalised per token (softmax
probabilities are unchanged; sigmoid scores are normalised as Megatron-Core does for its
auxiliary losses, with the sum floored at :math:`10^{-15}` where Megatron-Core adds
:math:`10^{-20}`, so that a token whose every logit is below about -37 keeps a finite gradient
on every backend) and :math:`P_e = \frac{1}{T}\sum_t \hat p_{t,e}`.

Every loss returns a float32 scalar array of the routing's backend. Every loss takes an optional
``mask`` of valid tokens, shape (T,) or (G, S), bool: masked tokens and rows with non-finite logits
contribute nothing, and every mean counts valid tokens only, so a padded batch gives the loss of
the batch without its padding. There is no registry of losses: add them to your objective with
your own coefficients, per layer, and use :func:`aggregate` to combine layers.

**Zero tokens.** A batch with no valid token (``T = 0``, ``G = 0`` groups, or every token masked
or non-finite) is legal, as an expert-parallel rank or a last micro-batch may hold none: every
loss then returns ``0.0``, a constant with a zero gradient, so it adds nothing to the objective.

**Layout.** One module per job: :mod:`~moerouter.losses.balancing` (Switch-style and sequence-wise
load balancing), :mod:`~moerouter.losses.null` (AdaMoE's null-aware form),
:mod:`~moerouter.losses.state` (global-batch balancing, state in, state out),
:mod:`~moerouter.losses.shazeer` (importance and load losses),
:mod:`~moerouter.losses.regularisers` (entropy, z-loss) and :mod:`~moerouter.losses.layers`
(:func:`aggregate`), :mod:`~moerouter.losses.locality` (LocMoE's locality loss),
:mod:`~moerouter.losses.adaptive` (top-p, ReLU routing and causal expert choice); import every
loss from ``moerouter.losses``.
"""

# Private names of the former losses.py that branches written against it import from here.
from moerouter._validation import check_routing as _check_routing  # noqa: F401
from moerouter._validation import flat_mask as _flat_mask  # noqa: F401
from moerouter._validation import mask_shapes as _mask_shapes  # noqa: F401
from moerouter._validation import valid_tokens as _valid_tokens  # noqa: F401
from moerouter.losses.adaptive import (
    causal_predictor_loss,
    dynamic_loss,
    relu_cut_fraction,
    relu_l1_loss,
    relu_sparsity,
    routed_load_balancing,
)
from moerouter.losses.balancing import load_balancing, sequence_load_balancing
from moerouter.losses.layers import aggregate
from moerouter.losses.locality import locality_loss
from moerouter.losses.null import null_load_balancing
from moerouter.losses.regularisers import entropy, z_loss
from moerouter.losses.shazeer import _erfc as _erfc  # private: tests import it from here
from moerouter.losses.shazeer import _normal_cdf as _normal_cdf
from moerouter.losses.shazeer import importance_loss, load_loss
from moerouter.losses.state import (
    BalanceState,
    MoEState,
    accumulate,
    balance_state_init,
    load_balancing_from_state,
    moe_state_init,
    moe_state_update,
)

__all__ = [
    "BalanceState",
    "MoEState",
    "accumulate",
    "aggregate",
    "balance_state_init",
    "causal_predictor_loss",
    "dynamic_loss",
    "entropy",
    "importance_loss",
    "load_balancing",
    "load_balancing_from_state",
    "load_loss",
    "locality_loss",
    "moe_state_init",
    "moe_state_update",
    "null_load_balancing",
    "relu_cut_fraction",
    "relu_l1_loss",
    "relu_sparsity",
    "routed_load_balancing",
    "sequence_load_balancing",
    "z_loss",
]

# Every public name reports this package as its module, as before the split: repr, pickling by
# reference, doctest.testmod(mr.losses) and the docs see one moerouter.losses.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
