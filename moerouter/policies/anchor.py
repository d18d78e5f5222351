r"""MEMoE: knowledge-anchor routing, so tokens that need the same knowledge use the same experts.

Wang and Li, "MEMoE: Enhancing Model Editing with Mixture of Experts Adaptors" (arXiv 2405.19086).
No code was released; the formulas below come from a summary of the paper and are UNVERIFIED
against its text (which layer, ``E``, ``k`` and how anchors are extracted are not known):

.. math::

    R(x_i) = [\,x_i \,;\, \mathrm{embed}(a_i)\,], \qquad
    G(x_i) = \mathrm{TopK}\big(\mathrm{softmax}(W_g\, R(x_i))\big)

where :math:`a_i` is the knowledge anchor (a named entity) of the input token :math:`x_i`.
:func:`anchor_router_input` builds :math:`R`; the user's gate gives the logits.

Concatenation makes routing of tokens with one anchor *similar*; the paper's goal is that they go
to the *same* experts. :func:`anchor_mean_logits` makes that exact: every token's logits are
replaced by the mean logits of the tokens that share its anchor (for a linear gate, the gate of
their mean representation), so a policy sees identical rows and picks identical experts.
:class:`AnchorRouting` applies that and hands the logits to any policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from moerouter._agnostic.scores import to_float32
from moerouter._arrays import device_of
from moerouter._capabilities import PolicyCapabilities
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import check_fields, check_positive_int, is_array
from moerouter.routing import Routing

__all__ = ["AnchorRouting", "anchor_mean_logits", "anchor_router_input"]


@fill_doc
def anchor_router_input(
    tokens: Array, anchor_ids: Array, anchor_embeddings: Array, *, xp: Any = None
) -> Array:
    """MEMoE's router input: each token's features concatenated with its anchor's embedding.

    Parameters
    ----------
    tokens : array (T, d)
        Token representations.
    anchor_ids : array (T,) int
        Anchor of each token in ``[0, A)``; -1 for a token without an anchor (it gets zeros).
    anchor_embeddings : array (A, a)
        One row per anchor.
    %(xp)s

    Returns
    -------
    array (T, d + a)
        Feed it to a gate with ``d + a`` inputs.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from moerouter.policies.anchor import anchor_router_input
    >>> anchor_router_input(xp.asarray([[1.0], [2.0]]), xp.asarray([1, -1]),
    ...                     xp.asarray([[0.0, 0.5], [7.0, 8.0]]))
    Array([[1., 7., 8.],
           [2., 0., 0.]], dtype=array_api_strict.float64)
    """
    for value, name in (
        (tokens, "tokens"),
        (anchor_ids, "anchor_ids"),
        (anchor_embeddings, "anchor_embeddings"),
    ):
        if not is_array(value):
            raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    xp = array_namespace(tokens, anchor_ids, anchor_embeddings) if xp is None else xp
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (T, d), got {tuple(tokens.shape)}")
    if anchor_embeddings.ndim != 2:
        raise ValueError(
            f"anchor_embeddings must have shape (A, a), got {tuple(anchor_embeddings.shape)}"
        )
    ids = _check_anchor_ids(anchor_ids, tokens.shape[0], xp=xp)
    has_anchor = ids >= 0
    rows = xp.take(anchor_embeddings, xp.where(has_anchor, ids, xp.zeros_like(ids)), axis=0)
    rows = xp.where(has_anchor[:, None], rows, xp.zeros_like(rows))
    dtype = xp.result_type(tokens.dtype, anchor_embeddings.dtype)
    return xp.concat([xp.astype(tokens, dtype), xp.astype(rows, dtype)], axis=1)


def _check_anchor_ids(anchor_ids: Array, num_tokens: int, *, xp: Any) -> Array:
    if anchor_ids.ndim != 1 or anchor_ids.shape[0] != num_tokens:
        raise ValueError(
            f"anchor_ids must have shape ({num_tokens},), got {tuple(anchor_ids.shape)}"
        )
    if not xp.isdtype(anchor_ids.dtype, "integral"):
        raise TypeError(f"anchor_ids must be integers, got {anchor_ids.dtype}")
    return xp.astype(anchor_ids, xp.int32)


@fill_doc
def anchor_mean_logits(
    logits: Array, anchor_ids: Array, *, num_anchors: int, xp: Any = None
) -> Array:
    r"""Replace each token's logits by the mean logits of all tokens sharing its anchor.

    :math:`\tilde\ell_t = \frac{1}{|\{s : a_s = a_t\}|} \sum_{s : a_s = a_t} \ell_s` for tokens
    with an anchor; a token with anchor -1 keeps its own logits. Rows of one anchor are then
    identical, so any deterministic policy routes them to the same experts (capacity limits can
    still drop some of them). Rows holding any non-finite entry (NaN, +inf, and also -inf
    masks) are left out of the means and keep their own logits, so a policy treats them as it
    always does.

    Parameters
    ----------
    logits : array (T, E') or (G, S, E')
        Router logits; groups are flattened (an anchor is shared across the whole batch).
    anchor_ids : array (T,) int
        Anchor of each token in ``[0, num_anchors)``, or -1 for none. Values are not checked on
        the device (no host sync); an id outside the range counts as no anchor.
    num_anchors : int
        ``A``, a static bound on the anchor ids (shapes stay static under ``jax.jit``).
    %(xp)s

    Returns
    -------
    array, the shape of ``logits``, float32

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from moerouter.policies.anchor import anchor_mean_logits
    >>> logits = xp.asarray([[1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    >>> anchor_mean_logits(logits, xp.asarray([0, 0, -1]), num_anchors=1)
    Array([[0.5, 1.5],
           [0.5, 1.5],
           [5. , 5. ]], dtype=array_api_strict.float32)
    """
    if not is_array(logits):
        raise TypeError(f"logits must be an array, got {type(logits).__name__}")
    if not is_array(anchor_ids):
        raise TypeError(f"anchor_ids must be an array, got {type(anchor_ids).__name__}")
    xp = array_namespace(logits, anchor_ids) if xp is None else xp
    check_positive_int(num_anchors, "num_anchors")
    if logits.ndim not in (2, 3):
        raise ValueError(
            f"logits must have shape (T, E') or (G, S, E'), got shape {tuple(logits.shape)}"
        )
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"logits must be a real floating dtype, got {logits.dtype}")
    shape = logits.shape
    values = xp.reshape(to_float32(logits, xp=xp), (-1, shape[-1]))
    ids = _check_anchor_ids(anchor_ids, values.shape[0], xp=xp)
    finite = xp.all(xp.isfinite(values), axis=-1)
    # One-hot membership (T, A): a matmul sums each anchor's rows in a fixed order, without
    # scatter, so it traces under jit; memory T * A is fine for the anchors of one batch.
    anchors = xp.arange(num_anchors, dtype=xp.int32, device=device_of(values))
    member = (ids[:, None] == anchors[None, :]) & finite[:, None]
    weights = xp.astype(member, xp.float32)
    clean = xp.where(finite[:, None], values, xp.zeros_like(values))
    sums = xp.matmul(xp.permute_dims(weights, (1, 0)), clean)  # (A, E')
    counts = xp.sum(weights, axis=0)[:, None]
    means = sums / xp.where(counts > 0, counts, xp.ones_like(counts))
    shared = xp.take(means, xp.where(ids >= 0, ids, xp.zeros_like(ids)), axis=0)
    use_shared = xp.any(member, axis=1)[:, None]
    return xp.reshape(xp.where(use_shared, shared, values), shape)


# grouped=False: an anchor is shared across the whole batch, so groups are not independent.
@PolicyCapabilities(scores=(), capacity="none", grouped=False, wraps_policy=True)
@dataclass(frozen=True)
class AnchorRouting:
    """Any policy, with the tokens of one knowledge anchor routed as one (MEMoE, UNVERIFIED).

    Calls :func:`anchor_mean_logits` and then ``policy`` on the result: tokens that share an
    anchor get identical logits rows, hence identical experts and weights from any deterministic
    policy (before capacity drops). See the module docstring for the paper's concatenation form,
    :func:`anchor_router_input`, which this can be combined with.

    Parameters
    ----------
    policy : callable
        Any moerouter policy (``TopK``, ``NullExperts``, ``ExpertChoice``, ...).
    num_anchors : int
        Static bound on the anchor ids.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.policies.AnchorRouting(mr.TopK(num_experts=3, k=1), num_anchors=2)
    >>> logits = xp.asarray([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    >>> router(logits, xp.asarray([0, 0, 1])).expert_ids
    Array([0, 0, 1], dtype=array_api_strict.int32)
    """

    policy: Any
    num_anchors: int

    def __post_init__(self) -> None:
        check_fields(self)
        if not callable(self.policy):
            raise TypeError(f"policy must be a moerouter policy, got {type(self.policy).__name__}")
        check_positive_int(self.num_anchors, "num_anchors")

    def __call__(self, logits: Array, anchor_ids: Array) -> Routing:
        """Route ``logits`` (T, E') or (G, S, E') with anchors ``anchor_ids`` (T,)."""
        routing: Routing = self.policy(
            anchor_mean_logits(logits, anchor_ids, num_anchors=self.num_anchors)
        )
        return routing
