"""Hash layers: each token id goes to experts fixed before training (Roller et al. 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from array_api_compat import array_namespace, is_array_api_obj

from moerouter import _registry
from moerouter._arrays import check_index_bound, device_of
from moerouter._capabilities import PolicyCapabilities
from moerouter._typing import Array
from moerouter._validation import check_fields, check_int, check_positive_int
from moerouter.routing import Routing

__all__ = ["HashRouter", "balanced_hash_table", "random_hash_table"]


@PolicyCapabilities(scores=(), capacity="none", causal=True)
@dataclass(frozen=True, eq=False)
class HashRouter:
    r"""Hash routing: token id :math:`v` goes to the experts :math:`h(v)`, fixed, never learned.

    Hash layers (Roller, Sukhbaatar, Szlam, Weston, "Hash Layers For Large Sparse Models",
    NeurIPS 2021): :math:`y_t = \frac{1}{k} \sum_{e \in h(v_t)} f_e(x_t)`, with :math:`h` chosen
    before training. With ``table=None`` the hash is :math:`h(v) = v \bmod E` (k = 1); with a
    table of shape ``(V,)`` it is the lookup :math:`h(v) = \mathrm{table}[v]` (k = 1), and with
    ``(V, k)`` each token goes to its row's k experts with weight 1/k each (the ``hash[V, k]``
    tables of third-party MultiHash-style routers). Build tables with :func:`random_hash_table`
    (Roller's random hash) or :func:`balanced_hash_table` (frequency-balanced). The paper's other
    variants (bigram, clustered, dispersed hashes, MultiHash slicing) are not provided
    [UNVERIFIED details].

    The input is the token ids, not logits. An id outside ``[0, V)`` (or negative, for the
    modulo hash) routes nowhere: expert -1, weight 0, ``finite_rows`` False — use -1 for
    padding. ``probs`` holds the routed mass, 1/k on each of a token's experts, so the balancing
    losses and :mod:`moerouter.stats` read hash routings like any other. No capacity is applied.

    Parameters
    ----------
    num_experts : int
        ``E``.
    table : array-like of int, optional
        ``(V,)`` or ``(V, k)`` experts in ``[0, E)``, copied to NumPy on creation and to the ids'
        backend on each call; rows of a ``(V, k)`` table must not repeat an expert.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.HashRouter(num_experts=4)(xp.asarray([5, 6, -1])).expert_ids
    Array([ 1,  2, -1], dtype=array_api_strict.int32)
    >>> router = mr.HashRouter(num_experts=4, table=[[0, 1], [2, 3]])
    >>> router(xp.asarray([1])).weights
    Array([0.5, 0.5], dtype=array_api_strict.float32)
    """

    num_experts: int
    table: Any = None
    _table: npt.NDArray[np.int32] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.num_experts, "num_experts")
        if self.table is None:
            return
        table = np.asarray(self.table)
        if table.dtype.kind not in "iu":
            raise TypeError(f"table must hold integers, got dtype {table.dtype}")
        if table.ndim not in (1, 2) or table.shape[0] == 0 or table.size == 0:
            raise ValueError(f"table must have shape (V,) or (V, k), got {table.shape}")
        if np.any(table < 0) or np.any(table >= self.num_experts):
            raise ValueError(f"table entries must be experts in [0, {self.num_experts})")
        table = table.reshape(table.shape[0], -1).astype(np.int32)
        if table.shape[1] > self.num_experts:
            raise ValueError(f"table rows hold k = {table.shape[1]} > num_experts experts")
        if any(len(set(row)) != len(row) for row in table.tolist()):
            raise ValueError("a table row repeats an expert")
        table.setflags(write=False)
        object.__setattr__(self, "_table", table)

    @property
    def k(self) -> int:
        """Experts per token."""
        return 1 if self._table is None else int(self._table.shape[1])

    def __call__(self, token_ids: Array) -> Routing:
        """Route token ids of shape (T,) or (G, S); see the class docstring."""
        if not is_array_api_obj(token_ids):
            raise TypeError(f"token_ids must be an array, got {type(token_ids).__name__}")
        xp = array_namespace(token_ids)
        _registry.backend_for(token_ids)  # the JAX plugin makes Routing a pytree
        if token_ids.ndim not in (1, 2):
            raise ValueError(
                f"token_ids must have shape (tokens,) or (groups, tokens), "
                f"got shape {tuple(token_ids.shape)}"
            )
        if not xp.isdtype(token_ids.dtype, "integral"):
            raise TypeError(f"token_ids must be an integer array, got {token_ids.dtype}")
        num_groups = 1 if token_ids.ndim == 1 else int(token_ids.shape[0])
        num_tokens, k = math.prod(token_ids.shape), self.k
        check_index_bound("assignments", T=num_tokens, k=k)
        where = device_of(token_ids)
        ids = xp.reshape(xp.astype(token_ids, xp.int32), (-1,))
        if self._table is None:
            valid = ids >= 0
            choice = xp.where(valid, ids, xp.zeros_like(ids)) % self.num_experts
            choice = choice[:, None]
        else:
            vocab = int(self._table.shape[0])
            table = xp.asarray(self._table, device=where, copy=True)
            valid = (ids >= 0) & (ids < vocab)
            rows = xp.where(valid, ids, xp.zeros_like(ids))
            choice = xp.take(table, rows, axis=0)  # (T, k)
        expert_ids = xp.where(valid[:, None], choice, xp.asarray(-1, dtype=xp.int32, device=where))
        share = xp.asarray(1.0 / k, dtype=xp.float32, device=where)
        zero = xp.asarray(0.0, dtype=xp.float32, device=where)
        weights = xp.where(valid[:, None], share, zero)
        experts = xp.arange(self.num_experts, dtype=xp.int32, device=where)
        hit = xp.any(expert_ids[:, :, None] == experts, axis=1)  # (T, E)
        probs = xp.where(hit, share, zero)
        weights = xp.broadcast_to(weights, (num_tokens, k))
        tokens = xp.arange(num_tokens, dtype=xp.int32, device=where)
        return Routing(
            token_ids=xp.reshape(xp.broadcast_to(tokens[:, None], (num_tokens, k)), (-1,)),
            expert_ids=xp.reshape(expert_ids, (-1,)),
            weights=xp.reshape(weights, (-1,)),
            choice_ids=xp.reshape(xp.astype(choice, xp.int32), (-1,)),
            probs=probs,
            finite_rows=valid,
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            layout="token",
            slots=k,
            num_groups=num_groups,
        )


def random_hash_table(
    vocab_size: int, num_experts: int, *, seed: int, k: int = 1
) -> npt.NDArray[np.int32]:
    """Roller et al.'s random hash: each token id gets ``k`` distinct uniformly random experts.

    Parameters
    ----------
    vocab_size, num_experts : int
    seed : int
        For :func:`numpy.random.default_rng`; the table is a pure function of its arguments.
    k : int
        Experts per token id, ``1 <= k <= num_experts``.

    Returns
    -------
    numpy.ndarray, int32, ``(vocab_size,)`` for k = 1, else ``(vocab_size, k)``

    Examples
    --------
    >>> import moerouter as mr
    >>> mr.random_hash_table(6, 3, seed=0).shape
    (6,)
    """
    check_positive_int(vocab_size, "vocab_size")
    check_positive_int(num_experts, "num_experts")
    check_positive_int(k, "k")
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts = {num_experts}, got {k}")
    rng = np.random.default_rng(check_int(seed, "seed"))
    table = np.argsort(rng.random((vocab_size, num_experts)), axis=1)[:, :k].astype(np.int32)
    return table[:, 0] if k == 1 else table


def balanced_hash_table(token_counts: Any, num_experts: int) -> npt.NDArray[np.int32]:
    """Frequency-balanced hash: most frequent ids first, each to the least-loaded expert.

    Roller et al.'s "balanced assignment" hash (greedy on unigram frequencies) [UNVERIFIED
    details]: ids are taken in descending count (ties by id) and each goes to the expert with the
    smallest total count so far (ties to the lower expert).

    Parameters
    ----------
    token_counts : array-like (V,)
        How often each token id occurs in a sample of the training data.
    num_experts : int

    Returns
    -------
    numpy.ndarray (V,) int32

    Examples
    --------
    >>> import moerouter as mr
    >>> mr.balanced_hash_table([10, 1, 7, 3], 2).tolist()  # loads 10 + 1 and 7 + 3
    [0, 0, 1, 1]
    """
    check_positive_int(num_experts, "num_experts")
    counts = np.asarray(token_counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"token_counts must have shape (V,), got {counts.shape}")
    if counts.dtype.kind not in "iuf" or np.any(~np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("token_counts must be finite, non-negative numbers")
    load = np.zeros(num_experts, np.float64)
    table = np.zeros(counts.shape[0], np.int32)
    for token in sorted(range(counts.shape[0]), key=lambda t: (-float(counts[t]), t)):
        expert = int(np.argmin(load))
        table[token] = expert
        load[expert] += float(counts[token])
    return table
