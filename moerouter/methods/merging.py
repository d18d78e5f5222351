r"""MC-SMoE: merge experts guided by routing statistics, then compress them.

Li, Zhang, Yadav, Sung, Cheng, Bansal, Chen, "Merge, Then Compress: Demystify Efficient SMoE with
Hints from Its Routing Policy" (ICLR 2024). The steps follow the authors' code
(UNITES-Lab/MC-SMoE, ``mcsmoe/merging/grouping.py`` and ``permutation.py``):

1. :func:`collect_routing_statistics` over calibration batches: how often each expert is used and
   the Gram matrix of the router logits (pure state in, state out).
2. :func:`expert_frequencies` and :func:`expert_similarity`:
   :math:`f_e = n_e / \sum_i n_i` and :math:`\mathrm{Sim}(i, j) = (\cos(H_{:,i}, H_{:,j}) + 1) / 2`
   over the router logits :math:`H \in \mathbb{R}^{T \times E}`.
3. :func:`group_experts`: the ``G`` most used experts are the dominant experts; every other expert
   joins the group of its most similar dominant expert. :func:`num_groups_per_layer` spreads a
   total number of groups over layers by one global frequency threshold (the README default).
4. :func:`align_experts`: permute each member's hidden neurons to match its dominant expert
   (weight matching, a linear assignment). This step runs in NumPy and needs SciPy.
5. :func:`merge_experts`: :math:`W_g = \sum_{i \in g} f_i W_i / \sum_{i \in g} f_i`.
6. :func:`remap_routing` sends every assignment to its expert's merged expert (the paper keeps
   the E-output router and binds the members of a group to one module: the same thing), and
   :func:`merge_gate_rows` gives a smaller G-output gate instead (not in the paper).
7. :func:`low_rank_factors`: truncated SVD of a merged weight. The paper's sparse residual
   (PLATON pruning during fine-tuning) and its knowledge-distillation recovery are training
   procedures and are not part of this module.

Everything except :func:`align_experts` and :func:`num_groups_per_layer` works on any array-API
backend; grouping reads no concrete values, so it also runs under ``jax.jit``.

**Size.** Over 500 lines, kept as one module: it is one paper's seven-step pipeline around one
state type (:class:`RoutingStatistics`); almost half of it is numpydoc docstrings with runnable
examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
from array_api_compat import array_namespace

from moerouter._agnostic.select import bincount, top_k
from moerouter._arrays import device_of, host_copy
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    check_choice,
    check_int,
    check_positive_int,
    check_routing,
    is_array,
)
from moerouter.routing import Routing

__all__ = [
    "RoutingStatistics",
    "align_experts",
    "collect_routing_statistics",
    "expert_frequencies",
    "expert_similarity",
    "group_experts",
    "low_rank_factors",
    "merge_experts",
    "merge_gate_rows",
    "num_groups_per_layer",
    "remap_routing",
    "routing_statistics_init",
    "weight_matching_permutation",
]


class _RoutingStatisticsFields(NamedTuple):
    usage: Array
    logit_gram: Array
    num_tokens: Array


class RoutingStatistics(_RoutingStatisticsFields):
    """Routing statistics accumulated over calibration batches.

    A named tuple of arrays (the moerouter state convention: a pytree under ``jax.jit``, passes
    through ``torch.compile``). Build it with :func:`routing_statistics_init` (or let the first
    :func:`collect_routing_statistics` start from zero), update it with
    :func:`collect_routing_statistics`.

    Attributes
    ----------
    usage : array (E,) float32
        Real assignments counted per expert.
    logit_gram : array (E, E) float32
        :math:`H^\top H` summed over every token seen, ``H`` the router logits (or probabilities).
    num_tokens : array () float32
        Tokens with finite logits seen so far.
    num_experts : int
        ``E``, read from ``usage``'s shape. The constructor still takes it as a fourth argument
        (the former dataclass field), checked against ``usage``.
    """

    __slots__ = ()

    def __new__(
        cls,
        usage: Array,
        logit_gram: Array,
        num_tokens: Array,
        num_experts: int | None = None,
    ) -> RoutingStatistics:
        if num_experts is not None and int(usage.shape[0]) != num_experts:
            raise ValueError(f"usage has {usage.shape[0]} experts, num_experts = {num_experts}")
        return super().__new__(cls, usage, logit_gram, num_tokens)

    @property
    def num_experts(self) -> int:
        """``E``, the length of ``usage``."""
        return int(self.usage.shape[0])


def routing_statistics_init(num_experts: int, *, xp: Any, device: Any = None) -> RoutingStatistics:
    """Empty routing statistics: the state before the first calibration batch.

    :func:`collect_routing_statistics` of a batch into this state equals the call without a
    state.

    Parameters
    ----------
    num_experts : int
        ``E``.
    xp : namespace
        Array namespace of the routings to come.
    device : optional
        Their device.

    Returns
    -------
    RoutingStatistics
        Zero usage, zero Gram matrix, zero tokens (float32).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> mr.merging.routing_statistics_init(3, xp=xp).usage
    Array([0., 0., 0.], dtype=array_api_strict.float32)
    """
    check_positive_int(num_experts, "num_experts")
    if xp is None or not hasattr(xp, "zeros"):
        raise TypeError(f"xp must be an array namespace, got {xp!r}")
    return RoutingStatistics(
        usage=xp.zeros((num_experts,), dtype=xp.float32, device=device),
        logit_gram=xp.zeros((num_experts, num_experts), dtype=xp.float32, device=device),
        num_tokens=xp.zeros((), dtype=xp.float32, device=device),
    )


def collect_routing_statistics(
    routing: Routing,
    logits: Array | None = None,
    *,
    state: RoutingStatistics | None = None,
    count: Literal["all", "top1"] = "all",
    xp: Any = None,
) -> RoutingStatistics:
    """Add one calibration batch to the routing statistics; returns the new state.

    Parameters
    ----------
    routing : Routing
        The routing of the batch, from any policy.
    logits : array (T, E') or (G, S, E'), optional
        The router logits the routing came from; the similarity uses their first ``E`` columns.
        Without them the routing's probabilities stand in (not what the paper uses).
    state : RoutingStatistics, optional
        What previous batches gave; None starts from zero.
    count : {"all", "top1"}
        Count every real assignment (MC-SMoE's Mixtral code counts both top-2 choices), or only
        each token's first choice (its Switch code; token layout only).
    xp : namespace, optional
        Inferred from the routing's arrays.

    Returns
    -------
    RoutingStatistics
        A new state; ``state`` is not modified.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> logits = xp.asarray([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    >>> stats = mr.merging.collect_routing_statistics(mr.TopK(num_experts=3, k=1)(logits), logits)
    >>> stats.usage
    Array([2., 0., 1.], dtype=array_api_strict.float32)
    """
    routing = check_routing(routing)
    check_choice(count, "count", ("all", "top1"))
    xp = array_namespace(routing.expert_ids) if xp is None else xp
    num_experts = routing.num_experts
    if state is not None:
        if not isinstance(state, RoutingStatistics):
            raise TypeError(f"state must be RoutingStatistics, got {type(state).__name__}")
        if state.num_experts != num_experts:
            raise ValueError(
                f"state has num_experts = {state.num_experts}, the routing {num_experts}"
            )
    expert_ids = routing.expert_ids
    if count == "top1":
        if routing.layout != "token":
            raise ValueError('count="top1" needs a token-layout routing (token-choice policies)')
        expert_ids = xp.reshape(expert_ids, (routing.num_tokens, routing.slots))[:, 0]
    usage = bincount(expert_ids, num_experts, xp=xp, device=device_of(expert_ids))
    usage = xp.astype(usage, xp.float32)

    if logits is None:
        values = routing.probs[:, :num_experts]
    else:
        if not is_array(logits):
            raise TypeError(f"logits must be an array, got {type(logits).__name__}")
        if logits.ndim not in (2, 3) or logits.shape[-1] < num_experts:
            raise ValueError(
                f"logits must have shape (T, E') or (G, S, E') with E' >= num_experts = "
                f"{num_experts}, got shape {tuple(logits.shape)}"
            )
        values = xp.reshape(xp.astype(logits, xp.float32), (-1, logits.shape[-1]))
        if values.shape[0] != routing.num_tokens:
            raise ValueError(
                f"logits hold {values.shape[0]} tokens but the routing {routing.num_tokens}"
            )
        values = values[:, :num_experts]
    finite = routing.finite_rows[:, None] & xp.all(xp.isfinite(values), axis=-1, keepdims=True)
    values = xp.where(finite, values, xp.zeros_like(values))
    gram = xp.matmul(xp.permute_dims(values, (1, 0)), values)
    tokens = xp.sum(xp.astype(finite, xp.float32))
    if state is None:
        return RoutingStatistics(usage, gram, tokens)
    return RoutingStatistics(
        state.usage + usage, state.logit_gram + gram, state.num_tokens + tokens
    )


def expert_frequencies(statistics: RoutingStatistics, *, xp: Any = None) -> Array:
    """Usage frequency per expert, ``usage / sum(usage)`` (all zeros before any assignment)."""
    xp = array_namespace(statistics.usage) if xp is None else xp
    total = xp.sum(statistics.usage)
    return statistics.usage / xp.where(total > 0, total, xp.ones_like(total))


def expert_similarity(statistics: RoutingStatistics, *, xp: Any = None) -> Array:
    r"""MC-SMoE's router-logit similarity, :math:`(\cos(H_{:,i}, H_{:,j}) + 1) / 2`, (E, E).

    An expert whose logit column is all zero has cosine 0 with every expert (similarity 1/2).
    """
    xp = array_namespace(statistics.logit_gram) if xp is None else xp
    gram = statistics.logit_gram
    eye = xp.eye(statistics.num_experts, dtype=gram.dtype, device=device_of(gram))
    norms = xp.sqrt(xp.sum(gram * eye, axis=-1))
    denominator = norms[:, None] * norms[None, :]
    cosine = gram / xp.where(denominator > 0, denominator, xp.ones_like(denominator))
    return (xp.clip(cosine, -1.0, 1.0) + 1.0) / 2.0


@fill_doc
def group_experts(
    frequencies: Array, similarity: Array, num_groups: int, *, xp: Any = None
) -> tuple[Array, Array]:
    """Group experts around the dominant (most used) ones, MC-SMoE's routing-guided rule.

    The ``num_groups`` most used experts are dominant; dominant expert ``g`` (in descending
    usage, ties to the lower index) heads merged expert ``g``. Every other expert joins the
    dominant expert it is most similar to (ties to the more used dominant expert). This is the
    authors' global-grouping semantics; their per-layer variant indexes the similarity by the
    wrong expert, which is not reproduced.

    Parameters
    ----------
    frequencies : array (E,)
        From :func:`expert_frequencies` (any scores where larger means more used).
    similarity : array (E, E)
        From :func:`expert_similarity` (larger means more similar).
    num_groups : int
        ``G``, ``1 <= G <= E``.
    %(xp)s

    Returns
    -------
    expert_map : array (E,) int32
        Merged expert of every original expert, in ``[0, G)``.
    dominant : array (G,) int32
        The dominant expert of each merged expert.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> frequencies = xp.asarray([0.1, 0.5, 0.3, 0.1])
    >>> similarity = xp.asarray([[1.0, 0.2, 0.9, 0.1], [0.2, 1.0, 0.1, 0.8],
    ...                          [0.9, 0.1, 1.0, 0.3], [0.1, 0.8, 0.3, 1.0]])
    >>> expert_map, dominant = mr.merging.group_experts(frequencies, similarity, 2)
    >>> expert_map, dominant
    (Array([1, 0, 1, 0], dtype=array_api_strict.int32), Array([1, 2], dtype=array_api_strict.int32))
    """
    xp = array_namespace(frequencies, similarity) if xp is None else xp
    if frequencies.ndim != 1:
        raise ValueError(f"frequencies must have shape (E,), got {tuple(frequencies.shape)}")
    num_experts = int(frequencies.shape[0])
    if tuple(similarity.shape) != (num_experts, num_experts):
        raise ValueError(
            f"similarity must have shape ({num_experts}, {num_experts}), "
            f"got {tuple(similarity.shape)}"
        )
    check_positive_int(num_groups, "num_groups")
    if num_groups > num_experts:
        raise ValueError(f"num_groups must be <= E = {num_experts}, got {num_groups}")
    dominant = xp.astype(top_k(frequencies, num_groups, xp=xp), xp.int32)
    to_dominant = xp.take(similarity, dominant, axis=1)  # (E, G), columns in usage order
    nearest = xp.astype(top_k(to_dominant, 1, xp=xp)[:, 0], xp.int32)
    experts = xp.arange(num_experts, dtype=xp.int32, device=device_of(dominant))
    is_dominant = experts[:, None] == dominant[None, :]
    own = xp.astype(xp.argmax(xp.astype(is_dominant, xp.int32), axis=1), xp.int32)
    expert_map = xp.where(xp.any(is_dominant, axis=1), own, nearest)
    return expert_map, dominant


def num_groups_per_layer(
    frequencies: Array, average_num_groups: int, *, merge_layers: list[int] | None = None
) -> list[int]:
    """Spread ``average_num_groups * L`` groups over ``L`` layers by one global threshold.

    MC-SMoE's global grouping (``_assign_num_groups_per_layer``): layers not merged count every
    expert as frequency 1, each layer's most used expert is set to 1 (every layer keeps at least
    one group), the threshold is the ``(total + 1)``-th largest frequency over all layers, and a
    layer gets as many groups as it has experts above the threshold. When
    ``average_num_groups == E`` the authors lower the total by one so that the threshold exists.
    Runs in NumPy on concrete values.

    Parameters
    ----------
    frequencies : array (L, E)
        Usage frequency of every expert of every MoE layer.
    average_num_groups : int
        Mean groups per merged layer.
    merge_layers : list of int, optional
        Indices (into the first axis) of the layers to merge; default all.

    Returns
    -------
    list of int
        Groups per layer (``E`` for a layer that is not merged).

    Examples
    --------
    >>> import numpy as np
    >>> import moerouter as mr
    >>> mr.merging.num_groups_per_layer(np.array([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]]), 2)
    [1, 3]
    """
    usage = np.array(
        host_copy(frequencies, "frequencies", "num_groups_per_layer"), dtype=np.float64
    )
    if usage.ndim != 2:
        raise ValueError(f"frequencies must have shape (L, E), got {usage.shape}")
    num_layers, num_experts = usage.shape
    check_positive_int(average_num_groups, "average_num_groups")
    if average_num_groups > num_experts:
        raise ValueError(f"average_num_groups must be <= E = {num_experts}")
    merged = list(range(num_layers)) if merge_layers is None else list(merge_layers)
    if any(not 0 <= layer < num_layers for layer in merged):
        raise ValueError(f"merge_layers must be layer indices in [0, {num_layers})")
    total = average_num_groups * len(merged) + num_experts * (num_layers - len(merged))
    for layer in range(num_layers):
        if layer not in merged:
            usage[layer] = 1.0
        usage[layer, int(np.argmax(usage[layer]))] = 1.0
    if average_num_groups == num_experts:
        total -= 1
    ranked = np.sort(usage.reshape(-1), kind="stable")[::-1]
    threshold = ranked[total]
    if threshold == 1.0:
        raise ValueError("average_num_groups is too large for these frequencies; reduce it")
    return [int(np.sum(row > threshold)) for row in usage]


def _check_weights(weights: object, num_experts: int | None) -> dict[str, Array]:
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError("weights must be a non-empty mapping of name -> array (E, ...)")
    out: dict[str, Array] = {}
    for name, value in weights.items():
        if not is_array(value) or value.ndim < 1:
            raise TypeError(f"weights[{name!r}] must be an array with a leading expert axis")
        if num_experts is None:
            num_experts = int(value.shape[0])
        if value.shape[0] != num_experts:
            raise ValueError(
                f"weights[{name!r}] has {value.shape[0]} experts on its first axis, "
                f"expected {num_experts}"
            )
        out[str(name)] = value
    return out


def weight_matching_permutation(
    reference: Mapping[str, Array], target: Mapping[str, Array], neuron_axis: Mapping[str, int]
) -> np.ndarray:
    r"""The neuron permutation of ``target`` that best matches ``reference`` (weight matching).

    Solves :math:`\max_P \sum_{\text{name}} \langle W^{\text{ref}}, P\, W^{\text{tgt}} \rangle`
    over permutations of the hidden neurons with
    ``scipy.optimize.linear_sum_assignment(cost, maximize=True)``, where
    ``cost[r, c]`` sums over the weights the inner product of reference neuron ``r`` with target
    neuron ``c`` (MC-SMoE's ``compute_switch_permutation_by_weight_matching``: ``Wi_ref Wi_tgtᵀ +
    Wo_refᵀ Wo_tgt``). Offline and NumPy only; needs SciPy.

    Parameters
    ----------
    reference, target : mapping of name -> array
        One expert's weights (no expert axis), any backend.
    neuron_axis : mapping of name -> int
        The hidden-neuron axis of each weight, e.g. ``{"w_in": 0, "w_out": 1}`` for
        ``w_in (F, d)``, ``w_out (d, F)``.

    Returns
    -------
    numpy.ndarray (F,) int64
        ``perm`` such that ``take(W_tgt, perm, axis=neuron_axis)`` is aligned with the reference.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "moerouter.merging.align_experts needs SciPy for the linear assignment: "
            "pip install scipy"
        ) from error
    cost: np.ndarray | None = None
    for name, axis in neuron_axis.items():
        ref = host_copy(reference[name], f"reference[{name!r}]", "weight_matching_permutation")
        tgt = host_copy(target[name], f"target[{name!r}]", "weight_matching_permutation")
        ref = np.moveaxis(np.asarray(ref, dtype=np.float64), axis, 0)
        tgt = np.moveaxis(np.asarray(tgt, dtype=np.float64), axis, 0)
        term = ref.reshape(ref.shape[0], -1) @ tgt.reshape(tgt.shape[0], -1).T
        if cost is not None and term.shape != cost.shape:
            raise ValueError(f"weights[{name!r}] has {term.shape[0]} neurons, others {len(cost)}")
        cost = term if cost is None else cost + term
    if cost is None:
        raise ValueError("neuron_axis must name at least one weight")
    rows, columns = linear_sum_assignment(cost, maximize=True)
    return np.asarray(columns[np.argsort(rows)], dtype=np.int64)


def align_experts(
    weights: Mapping[str, Array],
    expert_map: Array,
    dominant: Array,
    *,
    neuron_axis: Mapping[str, int],
    xp: Any = None,
) -> tuple[dict[str, Array], np.ndarray]:
    """Permute every non-dominant expert's hidden neurons to match its group's dominant expert.

    The permutation is the same for every weight of an expert (``w_in`` rows and ``w_out``
    columns, and a gated MLP's second input matrix), so each expert computes the same function
    before and after. The assignment is solved in NumPy with SciPy
    (:func:`weight_matching_permutation`); the permuted weights come back on their own backend.

    Parameters
    ----------
    weights : mapping of name -> array (E, ...)
        Every expert's weights stacked on a leading expert axis.
    expert_map, dominant : array
        From :func:`group_experts`.
    neuron_axis : mapping of name -> int
        Hidden-neuron axis of each weight, counted without the expert axis; every name of
        ``weights`` must appear (a weight without neurons, e.g. an output bias, cannot be
        permuted and must be merged separately).
    xp : namespace, optional
        Inferred from the weights.

    Returns
    -------
    aligned : dict of name -> array (E, ...)
        The permuted weights; dominant experts are unchanged.
    permutations : numpy.ndarray (E, F) int64
        The permutation applied to each expert (identity for dominant experts).

    Examples
    --------
    >>> import numpy as np
    >>> import moerouter as mr
    >>> w_in = np.stack([np.eye(3), np.eye(3)[[2, 0, 1]]])      # expert 1 = permuted expert 0
    >>> w_out = np.stack([np.eye(3), np.eye(3)[:, [2, 0, 1]]])
    >>> aligned, perms = mr.merging.align_experts(
    ...     {"w_in": w_in, "w_out": w_out}, np.array([0, 0]), np.array([0]),
    ...     neuron_axis={"w_in": 0, "w_out": 1})
    >>> bool(np.array_equal(aligned["w_in"][1], np.eye(3)))
    True
    """
    checked = _check_weights(weights, None)
    missing = sorted(set(checked) - set(neuron_axis))
    if missing:
        raise ValueError(f"neuron_axis has no axis for weights {missing}")
    for name, axis in neuron_axis.items():
        if name not in checked:
            raise ValueError(f"neuron_axis names {name!r}, which is not in weights")
        axis = check_int(axis, f"neuron_axis[{name!r}]")
        if not -(checked[name].ndim - 1) <= axis < checked[name].ndim - 1:
            raise ValueError(f"neuron_axis[{name!r}] = {axis} is out of range")
    xp = array_namespace(*checked.values()) if xp is None else xp
    groups = np.asarray(host_copy(expert_map, "expert_map", "align_experts"), dtype=np.int64)
    heads = np.asarray(host_copy(dominant, "dominant", "align_experts"), dtype=np.int64)
    num_experts = next(iter(checked.values())).shape[0]
    if groups.shape != (num_experts,) or np.any(groups < 0) or np.any(groups >= heads.size):
        raise ValueError(f"expert_map must hold E = {num_experts} labels in [0, {heads.size})")
    first = next(iter(neuron_axis))
    num_neurons = checked[first].shape[1:][neuron_axis[first]]
    permutations = np.tile(np.arange(num_neurons, dtype=np.int64), (num_experts, 1))
    for expert in range(num_experts):
        head = int(heads[groups[expert]])
        if head != expert:
            permutations[expert] = weight_matching_permutation(
                {name: value[head, ...] for name, value in checked.items()},
                {name: value[expert, ...] for name, value in checked.items()},
                neuron_axis,
            )
    aligned: dict[str, Array] = {}
    for name, value in checked.items():
        axis = neuron_axis[name] % (value.ndim - 1)
        where = device_of(value)
        rows = [
            xp.take(
                value[e, ...],
                xp.asarray(permutations[e], dtype=xp.int32, device=where),
                axis=axis,
            )
            for e in range(num_experts)
        ]
        aligned[name] = xp.stack(rows, axis=0)
    return aligned, permutations


def _group_matrix(
    expert_map: Array, frequencies: Array, num_groups: int, *, dtype: Any, xp: Any
) -> Array:
    """(G, E) merge coefficients: each row holds a group's frequencies, normalised to sum 1.

    A group whose frequencies sum to 0 (no member was ever used) gets a plain average; the
    authors' code divides by ``0 + eps`` there and would zero the merged expert.
    """
    groups = xp.arange(num_groups, dtype=xp.int32, device=device_of(expert_map))
    member = xp.astype(groups[:, None] == xp.astype(expert_map, xp.int32)[None, :], dtype)
    weighted = member * xp.astype(frequencies, dtype)[None, :]
    total = xp.sum(weighted, axis=1, keepdims=True)
    coefficients = xp.where(total > 0, weighted, member)
    total = xp.sum(coefficients, axis=1, keepdims=True)
    return coefficients / xp.where(total > 0, total, xp.ones_like(total))


def merge_experts(
    weights: Mapping[str, Array],
    expert_map: Array,
    frequencies: Array,
    *,
    num_groups: int,
    xp: Any = None,
) -> dict[str, Array]:
    r"""Merge each group by usage: :math:`W_g = \sum_{i \in g} f_i W_i / \sum_{i \in g} f_i`.

    MC-SMoE's ``_merge_mlp_experts_by_usage_frequency_weighting``, for every weight of the
    experts (align the neurons first with :func:`align_experts`). A group none of whose members
    was used is averaged uniformly.

    Parameters
    ----------
    weights : mapping of name -> array (E, ...)
        Float weights stacked on a leading expert axis; any backend.
    expert_map : array (E,) int
        Merged expert of each expert, in ``[0, num_groups)``.
    frequencies : array (E,)
        Merge weights, usually :func:`expert_frequencies`.
    num_groups : int
        ``G``.
    xp : namespace, optional
        Inferred from the weights.

    Returns
    -------
    dict of name -> array (G, ...)
        Merged weights, in each input's dtype.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> w = xp.asarray([[1.0, 1.0], [3.0, 3.0], [5.0, 7.0]])
    >>> mr.merging.merge_experts({"w": w}, xp.asarray([0, 0, 1]), xp.asarray([0.25, 0.25, 0.5]),
    ...                          num_groups=2)["w"]
    Array([[2., 2.],
           [5., 7.]], dtype=array_api_strict.float64)
    """
    if not is_array(expert_map) or expert_map.ndim != 1:
        raise ValueError("expert_map must be a one-dimensional integer array (E,)")
    checked = _check_weights(weights, int(expert_map.shape[0]))
    check_positive_int(num_groups, "num_groups")
    xp = array_namespace(*checked.values()) if xp is None else xp
    if tuple(frequencies.shape) != tuple(expert_map.shape):
        raise ValueError(
            f"frequencies must have shape {tuple(expert_map.shape)}, got {tuple(frequencies.shape)}"
        )
    merged: dict[str, Array] = {}
    for name, value in checked.items():
        if not xp.isdtype(value.dtype, "real floating"):
            raise TypeError(f"weights[{name!r}] must be a real floating dtype, got {value.dtype}")
        coefficients = _group_matrix(expert_map, frequencies, num_groups, dtype=value.dtype, xp=xp)
        flat = xp.reshape(value, (value.shape[0], -1))
        merged[name] = xp.reshape(xp.matmul(coefficients, flat), (num_groups, *value.shape[1:]))
    return merged


def merge_gate_rows(
    gate_weight: Array,
    expert_map: Array,
    frequencies: Array,
    *,
    num_groups: int,
    xp: Any = None,
) -> Array:
    """A G-row gate from an E-row gate: frequency-weighted average of each group's rows.

    Not in the paper, which keeps the E-output router and routes every member of a group to the
    merged expert (use :func:`remap_routing` for that; it is exact). A linear G-row gate cannot
    reproduce the summed member probabilities (a log-sum-exp of logits), so this is an
    approximation to fine-tune from.

    Parameters
    ----------
    gate_weight : array (E, d) or (E,)
        Router rows (a bias vector also works).
    expert_map, frequencies, num_groups, xp
        As in :func:`merge_experts`.

    Returns
    -------
    array (G, d) or (G,)
    """
    return merge_experts(
        {"gate_weight": gate_weight}, expert_map, frequencies, num_groups=num_groups, xp=xp
    )["gate_weight"]


def remap_routing(
    routing: Routing, expert_map: Array, *, num_groups: int, xp: Any = None
) -> Routing:
    """Send each assignment to the merged expert of its expert: the router after merging.

    ``expert_ids`` become merged ids; ``probs`` over real experts are summed per group (null
    columns keep their place after the ``G`` merged columns) and ``choice_ids`` follow. A token
    whose choices fall in one group keeps both assignments, so :func:`moerouter.combine` adds
    their weights: exactly the paper's "bind the members to one module".

    Parameters
    ----------
    routing : Routing
        Routing over the original ``E`` experts.
    expert_map : array (E,) int
        From :func:`group_experts`.
    num_groups : int
        ``G``.
    xp : namespace, optional
        Inferred from the routing.

    Returns
    -------
    Routing
        Same assignments, ``num_experts = G``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> routing = mr.TopK(num_experts=3, k=1)(xp.asarray([[0.0, 1.0, 2.0]]))
    >>> mr.merging.remap_routing(routing, xp.asarray([0, 1, 0]), num_groups=2).expert_ids
    Array([0], dtype=array_api_strict.int32)
    """
    routing = check_routing(routing)
    xp = array_namespace(routing.expert_ids, expert_map) if xp is None else xp
    check_positive_int(num_groups, "num_groups")
    num_experts = routing.num_experts
    if tuple(expert_map.shape) != (num_experts,):
        raise ValueError(
            f"expert_map must have shape ({num_experts},), got {tuple(expert_map.shape)}"
        )
    mapping = xp.astype(expert_map, xp.int32)
    real = routing.expert_ids >= 0
    safe = xp.where(real, routing.expert_ids, xp.zeros_like(routing.expert_ids))
    expert_ids = xp.where(real, xp.take(mapping, safe), routing.expert_ids)
    is_real_choice = routing.choice_ids < num_experts
    safe_choice = xp.where(is_real_choice, routing.choice_ids, xp.zeros_like(routing.choice_ids))
    choice_ids = xp.where(
        is_real_choice, xp.take(mapping, safe_choice), routing.choice_ids - num_experts + num_groups
    )
    groups = xp.arange(num_groups, dtype=xp.int32, device=device_of(mapping))
    member = xp.astype(mapping[:, None] == groups[None, :], routing.probs.dtype)
    merged_probs = xp.matmul(routing.probs[:, :num_experts], member)
    probs = xp.concat([merged_probs, routing.probs[:, num_experts:]], axis=1)
    return Routing(
        token_ids=routing.token_ids,
        expert_ids=expert_ids,
        weights=routing.weights,
        choice_ids=choice_ids,
        probs=probs,
        finite_rows=routing.finite_rows,
        num_tokens=routing.num_tokens,
        num_experts=num_groups,
        layout=routing.layout,
        slots=routing.slots,
        num_groups=routing.num_groups,
    )


def low_rank_factors(weight: Array, rank: int, *, xp: Any = None) -> tuple[Array, Array]:
    r"""Truncated SVD: ``left @ right`` is the best rank-``r`` approximation of ``weight``.

    :math:`W = U \Sigma V^\top \approx (U_{:, :r} \Sigma_r)(V^\top_{:r, :})`, batched over leading
    axes (MC-SMoE's low-rank part; its sparse residual is learned during fine-tuning and is not
    computed here).

    Parameters
    ----------
    weight : array (..., m, n)
        Float weights (e.g. merged experts, (G, m, n)).
    rank : int
        ``1 <= r <= min(m, n)``.
    xp : namespace, optional
        Inferred from ``weight``.

    Returns
    -------
    left : array (..., m, r)
    right : array (..., r, n)

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> left, right = mr.merging.low_rank_factors(xp.asarray([[2.0, 0.0], [0.0, 1.0]]), 1)
    >>> left @ right
    Array([[2., 0.],
           [0., 0.]], dtype=array_api_strict.float64)
    """
    if not is_array(weight) or weight.ndim < 2:
        raise TypeError("weight must be an array of shape (..., m, n)")
    xp = array_namespace(weight) if xp is None else xp
    if not xp.isdtype(weight.dtype, "real floating"):
        raise TypeError(f"weight must be a real floating dtype, got {weight.dtype}")
    check_positive_int(rank, "rank")
    if rank > min(weight.shape[-2:]):
        raise ValueError(f"rank must be <= min(m, n) = {min(weight.shape[-2:])}, got {rank}")
    u, s, vh = xp.linalg.svd(weight, full_matrices=False)
    return u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
