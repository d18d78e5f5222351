"""ReLU routing: every expert with a positive gate takes the token (ReMoE, Wang et al. 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from array_api_compat import array_namespace, is_array_api_obj

from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._validation import check_fields
from moerouter.policies._common import (
    check_capacity_options,
    check_positive_int,
)
from moerouter.policies._token_choice import (
    DROP_POLICIES,
    choose,
    clean_token_choice_logits,
    route_token_choice,
)
from moerouter.policies.top_p import check_max_k
from moerouter.routing import Routing

__all__ = ["ReLURouting", "ReLURoutingState", "relu_state_init", "update_l1_coefficient"]

Array = Any


@fill_doc
@PolicyCapabilities(scores=("relu",), capacity="optional", causal=True)
@dataclass(frozen=True)
class ReLURouting:
    r"""ReLU routing (Wang, Zhu, Chen, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU
    Routing", ICLR 2025, arXiv:2412.14711).

    The gate is :math:`R(x) = \mathrm{ReLU}(\ell)`; every expert with a positive gate takes the
    token, weighted by the gate itself (no softmax, no renormalisation):

    .. math::

        y = \sum_{e : \ell_e > 0} \mathrm{ReLU}(\ell_e) \, f_e(x).

    The output is continuous in the logits: an expert enters or leaves with weight 0, so the
    routing is differentiable almost everywhere. Sparsity is not fixed; an L1 penalty on the
    gates, :func:`moerouter.losses.relu_l1_loss`, whose coefficient
    :func:`update_l1_coefficient` adapts every step to hold a target sparsity, steers it to
    about ``k`` experts per token on average.

    **The cap.** Static shapes need a bound: a token has ``max_k`` slots, its largest logits in
    descending order (ties to the lower expert index, exact on every backend), and a slot routes
    only if its logit is ``> 0``. When more than ``max_k`` gates of a token are positive, the
    smallest ones are **cut**: they get no slot, no output and no task gradient, although their
    gates still count in ``probs``, in :func:`moerouter.losses.relu_sparsity` and in the L1
    penalty (which pushes them down). ``max_k = num_experts`` never cuts and is exactly the
    paper's rule; :func:`moerouter.losses.relu_cut_fraction` measures how often the cap bites.
    A row whose logits are all ``<= 0`` routes nowhere (zero output).

    ``Routing.probs`` holds the gates :math:`\mathrm{ReLU}(\ell)` (not probabilities: they do not
    sum to 1). Capacity, when set, is as in :class:`TopK` with ``k = max_k``.

    Parameters
    ----------
    %(num_experts_logits)s
    max_k : int
        Most experts per token, ``1 <= max_k <= E``.
    capacity_factor, capacity_multiple_of, drop_policy, strict
        As in :class:`TopK`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.ReLURouting(num_experts=4, max_k=2)(xp.asarray([[0.5, -1.0, 2.0, 0.1]]))
    >>> routing.expert_ids
    Array([2, 0], dtype=array_api_strict.int32)
    >>> routing.weights
    Array([2. , 0.5], dtype=array_api_strict.float32)
    """

    num_experts: int
    max_k: int
    capacity_factor: float | None = None
    capacity_multiple_of: int = 1
    drop_policy: Literal["position", "probs", "batch_priority"] = "position"
    strict: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        check_max_k(self.max_k, self.num_experts)
        check_capacity_options(self, DROP_POLICIES)

    def __call__(self, logits: Array) -> Routing:
        """Route ``logits`` of shape (T, E) or (G, S, E); see the class docstring."""
        clean = clean_token_choice_logits(self, logits, self.max_k, self.capacity_factor)
        xp = clean.xp
        gates = xp.maximum(clean.values, xp.zeros_like(clean.values))
        choice, chosen_logits = choose(clean, self.max_k)
        routed = (chosen_logits > 0) & clean.finite_rows[..., None]
        weights = xp.take_along_axis(gates, choice, axis=-1)
        return route_token_choice(
            self, clean, gates, choice, routed, weights, capacity_factor=self.capacity_factor
        )


class ReLURoutingState(NamedTuple):
    """The adaptive L1 coefficient of ReLU routing, carried from step to step.

    A named tuple of arrays, so it is a pytree under ``jax.jit`` and passes through
    ``torch.compile``. Build it with :func:`relu_state_init`, update it with
    :func:`update_l1_coefficient`.

    Attributes
    ----------
    coefficient : array () float32
        :math:`\\lambda_i`, the weight of :func:`moerouter.losses.relu_l1_loss` at step ``i``.
    """

    coefficient: Array


def relu_state_init(coefficient: float = 1e-8, *, xp: Any, device: Any = None) -> ReLURoutingState:
    """The state before the first step: :math:`\\lambda_0` (ReMoE's default is ``1e-8``).

    Parameters
    ----------
    coefficient : float
        :math:`\\lambda_0 > 0`.
    xp : namespace
        Array namespace of the training step (``numpy``, ``torch``, ``jax.numpy``, ...).
    device : optional
        Device of the training step.

    Returns
    -------
    ReLURoutingState

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.policies.relu_state_init(xp=xp).coefficient
    Array(1.e-08, dtype=array_api_strict.float32)
    """
    _check_positive(coefficient, "coefficient")
    if xp is None or not hasattr(xp, "asarray"):
        raise TypeError(f"xp must be an array namespace, got {xp!r}")
    return ReLURoutingState(xp.asarray(coefficient, dtype=xp.float32, device=device))


def _check_positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def update_l1_coefficient(
    state: ReLURoutingState,
    sparsity: Array,
    *,
    target_sparsity: float,
    multiplier: float = 1.2,
) -> ReLURoutingState:
    r"""One step of ReMoE's adaptive L1 coefficient: the new state.

    .. math::

        \lambda_{i+1} = \begin{cases}
            \lambda_i \, \alpha & S_i < S_{\text{target}} \\
            \lambda_i / \alpha & S_i \geq S_{\text{target}}
        \end{cases}

    with :math:`S_i` the measured sparsity of step ``i`` (share of zero gates,
    :func:`moerouter.losses.relu_sparsity`, averaged over layers and micro-batches as the
    caller sees fit; ReMoE averages over all of them and over data-parallel ranks),
    :math:`S_{\text{target}} = 1 - k/E` for about ``k`` experts per token, and
    :math:`\alpha` = ``multiplier`` (1.2 in ReMoE). The paper writes
    :math:`\lambda_i \alpha^{\mathrm{sign}(S_{\text{target}} - S_i)}`, which leaves
    :math:`\lambda` unchanged at equality; the authors' code (``training.py``) divides then, and
    so does this. A pure function: ``state`` is not changed.

    Parameters
    ----------
    state : ReLURoutingState
        From :func:`relu_state_init` or a previous update.
    sparsity : array ()
        :math:`S_i`, same backend as the state.
    target_sparsity : float
        In ``[0, 1)``.
    multiplier : float
        :math:`\alpha > 1`.

    Returns
    -------
    ReLURoutingState

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> state = mr.policies.relu_state_init(1.0, xp=xp)
    >>> state = mr.policies.update_l1_coefficient(state, xp.asarray(0.5), target_sparsity=0.75)
    >>> state.coefficient
    Array(1.2, dtype=array_api_strict.float32)
    """
    if not isinstance(state, ReLURoutingState):
        raise TypeError(
            f"state must be a moerouter.policies.ReLURoutingState, got {type(state).__name__}"
        )
    if not is_array_api_obj(sparsity):
        raise TypeError(f"sparsity must be an array, got {type(sparsity).__name__}")
    if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, int | float):
        raise TypeError(f"target_sparsity must be a number, got {type(target_sparsity).__name__}")
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
    if _check_positive(multiplier, "multiplier") <= 1.0:
        raise ValueError(f"multiplier must be > 1, got {multiplier}")
    try:
        xp = array_namespace(state.coefficient, sparsity)
    except TypeError as error:
        raise TypeError("state and sparsity must be arrays of one backend") from error
    if sparsity.ndim != 0:
        raise ValueError(f"sparsity must be a scalar array, got shape {tuple(sparsity.shape)}")
    coefficient = state.coefficient
    grown = xp.astype(sparsity, coefficient.dtype) < target_sparsity
    return ReLURoutingState(xp.where(grown, coefficient * multiplier, coefficient / multiplier))
