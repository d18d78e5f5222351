r"""HoME: multi-gate expert mixtures for multi-task learning, and diagnostics of their anomalies.

HoME (X. Wang, J. Cao, Z. Fu, K. Gai, G. Zhou, "HoME: Hierarchy of Multi-Gate Experts for
Multi-Task Learning at Kuaishou", arXiv:2408.05430, KDD 2025) builds on MMoE: every task has its
own softmax gate over shared and task-specific experts. The abstract reports three anomalies of
such models in production and a fix for each:

- **expert collapse** (expert outputs distributed very differently, some experts over 90 % zero
  after ReLU) -- fixed by expert normalisation and Swish (:func:`expert_normalization`);
- **expert degradation** (a shared expert used by one task only) -- fixed by a hierarchy mask
  over meta-categories of tasks (:func:`hierarchy_mask`);
- **expert underfitting** (data-sparse tasks ignore their specific experts for shared ones) --
  fixed by feature-gate and self-gate mechanisms (:func:`feature_gate`, :func:`self_gate`).

:func:`expert_collapse`, :func:`expert_degradation` and :func:`expert_underfitting` measure the
anomalies from arrays a model already has (expert activations, gate weights).

Everything is a pure function of arrays: weights and statistics are given, nothing is learned or
stored here. Shapes: ``N`` rows (samples), ``E`` experts, ``d`` features, ``tasks`` tasks.

**UNVERIFIED:** HoME has no official code and its method section could not be read; the anomaly
definitions are from the abstract, and the formulas of the fixes follow reference/algorithms.md
§7, cross-checked against an unofficial re-implementation. The self-gate formula especially is a
best reading, not the paper's text.

**Size.** Over 500 lines, kept as one module: it is one paper's method (three fixes and the
three diagnostics that measure what they fix, on the same gate and activation shapes); more
than half of it is numpydoc docstrings with runnable examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from array_api_compat import is_array_api_obj

from moerouter._agnostic.scores import sigmoid, softmax
from moerouter._arrays import device_of, host_copy
from moerouter._docs import fill_doc
from moerouter._typing import Array
from moerouter._validation import (
    bool_array,
    check_int,
    check_positive_int,
    check_real,
    check_shape,
    float_array,
    namespace,
)

__all__ = [
    "expert_collapse",
    "expert_degradation",
    "expert_normalization",
    "expert_underfitting",
    "feature_gate",
    "hierarchy_mask",
    "mix",
    "multi_gate",
    "self_gate",
]


@fill_doc
def multi_gate(
    gate_logits: Array,
    visible: Array | None = None,
    *,
    single_expert: Literal["softmax", "sigmoid"] = "softmax",
    xp: Any = None,
) -> Array:
    r"""Per-task gate weights: a softmax over the experts each task can see (MMoE, HoME).

    .. math::

       g_{n,t,e} = \frac{\mathbb{1}[e \in V_t]\, e^{\ell_{n,t,e}}}
                        {\sum_{e' \in V_t} e^{\ell_{n,t,e'}}},

    where :math:`\ell_{n,t,\cdot}` is task :math:`t`'s gate logits for row :math:`n` (typically
    :math:`x_n W_t`) and :math:`V_t` the experts visible to task :math:`t` (every expert in
    MMoE; a :func:`hierarchy_mask` row in HoME). Hidden experts get weight exactly 0 and their
    logits get no gradient. With ``single_expert="sigmoid"``, a task that sees exactly one expert
    weighs it by :math:`\sigma(\ell)` instead of a constant 1 (what the unofficial HoME
    re-implementation does; UNVERIFIED in the paper).

    Parameters
    ----------
    gate_logits : array (N, tasks, E)
        Gate logits of every task over every expert, any real floating dtype.
    visible : array (tasks, E) of bool, optional
        Which experts each task sees; all when None. A task that sees no expert gets NaN gates
        (not checked, to avoid a host synchronisation per call).
    single_expert : {"softmax", "sigmoid"}
        Weight of a task's only visible expert: 1, or the sigmoid of its logit.
    %(xp)s

    Returns
    -------
    array (N, tasks, E)
        float32 gate weights; each task's row sums to 1 (``"softmax"``).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> logits = xp.zeros((1, 2, 3))
    >>> visible = xp.asarray([[True, True, False], [True, False, True]])
    >>> mr.multitask.multi_gate(logits, visible)
    Array([[[0.5, 0.5, 0. ],
            [0.5, 0. , 0.5]]], dtype=array_api_strict.float32)
    """
    if single_expert not in ("softmax", "sigmoid"):
        raise ValueError(f"single_expert must be 'softmax' or 'sigmoid', got {single_expert!r}")
    arrays = [gate_logits] + ([visible] if visible is not None else [])
    xp = namespace(*arrays, xp=xp)
    logits = float_array(gate_logits, "gate_logits", ndim=(3,), xp=xp)
    num_tasks, num_experts = int(logits.shape[1]), int(logits.shape[2])
    if visible is None:
        mask = xp.ones((num_tasks, num_experts), dtype=xp.bool, device=device_of(logits))
    else:
        mask = bool_array(visible, "visible", shape=(num_tasks, num_experts), xp=xp)
    # A task that sees no expert gets NaN gates (0 / 0) rather than an error: checking the mask's
    # values would cost a host synchronisation on every call. hierarchy_mask never builds one.
    seen = xp.sum(xp.astype(mask, xp.int32), axis=1)
    shown = mask[None, :, :]
    # Hidden logits are replaced before the max and the exp, so they reach neither the value nor
    # (through a where) the gradient, and an inf there cannot produce NaN.
    values = xp.where(shown, logits, xp.zeros_like(logits))
    alone = (seen == 1)[None, :, None] & shown
    softmax_values = values
    if single_expert == "sigmoid":
        # A lone expert's weight is its sigmoid: keep its (maybe infinite) logit out of the
        # softmax, whose inf - inf would put a NaN in the gradient.
        softmax_values = xp.where(alone, xp.zeros_like(values), values)
    floor = xp.full_like(values, -xp.inf)
    row_max = xp.max(xp.where(shown, softmax_values, floor), axis=2, keepdims=True)
    exp = xp.where(shown, xp.exp(softmax_values - row_max), xp.zeros_like(values))
    total = xp.sum(exp, axis=2, keepdims=True)
    gates = exp / xp.where(total > 0, total, xp.full_like(total, xp.nan))  # NaN, not 0 / 0
    if single_expert == "sigmoid":
        gates = xp.where(alone, sigmoid(values, xp=xp), gates)
    return gates


@fill_doc
def mix(gates: Array, expert_outputs: Array, *, xp: Any = None) -> Array:
    r"""Each task's input: the gate-weighted sum of expert outputs.

    :math:`h_{n,t} = \sum_e g_{n,t,e}\, f_e(x_n)`, a batched matrix product accumulated in
    float32.

    Parameters
    ----------
    gates : array (N, tasks, E)
        From :func:`multi_gate`.
    expert_outputs : array (N, E, d)
        Every expert's output for every row.
    %(xp)s

    Returns
    -------
    array (N, tasks, d)
        float32.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> gates = xp.asarray([[[0.25, 0.75]]])
    >>> outputs = xp.asarray([[[4.0], [8.0]]])
    >>> mr.multitask.mix(gates, outputs)
    Array([[[7.]]], dtype=array_api_strict.float32)
    """
    xp = namespace(gates, expert_outputs, xp=xp)
    weights = float_array(gates, "gates", ndim=(3,), xp=xp)
    outputs = float_array(expert_outputs, "expert_outputs", ndim=(3,), xp=xp)
    expected = (int(weights.shape[0]), int(weights.shape[2]), int(outputs.shape[2]))
    check_shape(outputs, "expert_outputs", expected)
    return xp.matmul(weights, outputs)


def hierarchy_mask(
    task_category: Sequence[int] | Array,
    *,
    num_shared: int,
    num_per_category: int,
    num_per_task: int,
    num_categories: int | None = None,
    xp: Any = None,
) -> tuple[Array, Array]:
    r"""HoME's hierarchy mask: which experts each task sees, and which are its own.

    Experts are laid out as ``num_shared`` globally shared experts, then ``num_per_category``
    experts for each meta-category (category 0's first), then ``num_per_task`` experts for each
    task (task 0's first), so
    ``E = num_shared + num_categories * num_per_category + num_tasks * num_per_task``. Task
    :math:`t` of category :math:`c` sees the global experts, category :math:`c`'s experts and its
    own; other categories' and tasks' experts are masked out. HoME groups tasks into
    meta-categories (at Kuaishou, e.g. watch-time and interaction tasks) so that a shared expert is
    shared by related tasks, against expert degradation.

    HoME's first (meta) level, where each category gates over the global and its own experts, is
    the same layout with categories in place of tasks:
    ``hierarchy_mask(range(C), num_shared=S, num_per_category=0, num_per_task=M)``.

    UNVERIFIED: the layout follows reference/algorithms.md §7 (the paper's method section could
    not be read); the expert order is this library's convention.

    Parameters
    ----------
    task_category : sequence of int, or int array (tasks,)
        Meta-category of each task, in ``[0, num_categories)``.
    num_shared, num_per_category, num_per_task : int
        Expert counts (each ``>= 0``; together ``>= 1``).
    num_categories : int, optional
        Number of categories; ``max(task_category) + 1`` when None.
    xp : namespace, optional
        Namespace of the returned arrays; that of ``task_category`` if it is an array, else NumPy.

    Returns
    -------
    visible : array (tasks, E) of bool
        The experts each task gates over; pass to :func:`multi_gate`.
    specific : array (tasks, E) of bool
        Each task's own experts; pass to :func:`expert_underfitting`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> visible, specific = mr.multitask.hierarchy_mask(
    ...     [0, 0, 1], num_shared=1, num_per_category=1, num_per_task=1, xp=xp)
    >>> xp.astype(visible, xp.int8)  # columns: global, cat 0, cat 1, task 0, task 1, task 2
    Array([[1, 1, 0, 1, 0, 0],
           [1, 1, 0, 0, 1, 0],
           [1, 0, 1, 0, 0, 1]], dtype=array_api_strict.int8)
    """
    import numpy as np

    if xp is None:
        xp = namespace(task_category, xp=None) if is_array_api_obj(task_category) else np
    categories = _categories(task_category)
    shared = check_positive_int(num_shared, "num_shared", minimum=0)
    per_category = check_positive_int(num_per_category, "num_per_category", minimum=0)
    per_task = check_positive_int(num_per_task, "num_per_task", minimum=0)
    if num_categories is None:
        num_categories = max(categories) + 1
    num_categories = check_positive_int(num_categories, "num_categories")
    if any(c >= num_categories for c in categories):
        raise ValueError(f"task_category must lie in [0, num_categories = {num_categories})")
    num_tasks = len(categories)
    num_experts = shared + num_categories * per_category + num_tasks * per_task
    if num_experts == 0:
        raise ValueError("num_shared, num_per_category and num_per_task give no expert at all")
    visible = np.zeros((num_tasks, num_experts), dtype=bool)
    specific = np.zeros((num_tasks, num_experts), dtype=bool)
    visible[:, :shared] = True
    task_start = shared + num_categories * per_category
    for task, category in enumerate(categories):
        start = shared + category * per_category
        visible[task, start : start + per_category] = True
        own = task_start + task * per_task
        visible[task, own : own + per_task] = True
        specific[task, own : own + per_task] = True
    if not visible.any(axis=1).all():
        raise ValueError("every task must see at least one expert")
    where = device_of(task_category) if is_array_api_obj(task_category) else None
    return xp.asarray(visible, device=where), xp.asarray(specific, device=where)


@fill_doc
def feature_gate(features: Array, down: Array, up: Array, *, xp: Any = None) -> Array:
    r"""HoME's feature gate: a per-expert low-rank sigmoid gate on the input features.

    .. math::

       v_e = v \odot 2\,\sigma(v B_e A_e),

    with :math:`B_e \in \mathbb{R}^{d \times r}` (``down``) and
    :math:`A_e \in \mathbb{R}^{r \times d}` (``up``), a LoRA-style rank-:math:`r` map. The factor 2
    keeps the gate near 1 when :math:`vBA \approx 0` (at initialisation), so gating starts as the
    identity. Each expert thus reads its own privatised copy of the shared input.

    UNVERIFIED: from the unofficial re-implementation (``Fea_Gate(v) = 2 * Sigmoid(v(BA))``) as
    reference/algorithms.md §7 records it; the paper's text could not be read.

    Parameters
    ----------
    features : array (N, d)
        The shared input :math:`v`.
    down : array (d, r) or (E, d, r)
        :math:`B`, for one expert or for each of ``E`` experts.
    up : array (r, d) or (E, r, d)
        :math:`A`, matching ``down``.
    %(xp)s

    Returns
    -------
    array (N, d) or (N, E, d)
        float32 gated features, per expert when ``down`` is 3-D.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> v = xp.asarray([[1.0, -2.0]])
    >>> mr.multitask.feature_gate(v, xp.zeros((2, 1)), xp.zeros((1, 2)))  # zero LoRA: identity
    Array([[ 1., -2.]], dtype=array_api_strict.float32)
    """
    xp = namespace(features, down, up, xp=xp)
    values = float_array(features, "features", ndim=(2,), xp=xp)
    low = float_array(down, "down", ndim=(2, 3), xp=xp)
    high = float_array(up, "up", ndim=(2, 3), xp=xp)
    width = int(values.shape[1])
    if high.ndim != low.ndim:
        raise ValueError(f"up must have {low.ndim} dimensions like down, got {high.ndim}")
    batch = tuple(int(n) for n in low.shape[:-2])
    rank = int(low.shape[-1])
    check_shape(low, "down", (*batch, width, rank))
    check_shape(high, "up", (*batch, rank, width))
    gate_logits = xp.matmul(xp.matmul(values, low), high)  # (d,) or (E, N, d)
    gated = 2.0 * sigmoid(gate_logits, xp=xp) * values
    if low.ndim == 3:
        gated = xp.permute_dims(gated, (1, 0, 2))
    return gated


@fill_doc
def self_gate(
    expert_outputs: Array,
    gate_logits: Array,
    *,
    residual: Array | None = None,
    xp: Any = None,
) -> Array:
    r"""HoME's self-gate: a gate over a lower level's experts, added to the upper level's output.

    .. math::

       h_n = r_n + \sum_e w_{n,e}\, f_e(x_n), \qquad
       w_{n,\cdot} = \begin{cases} \sigma(\ell_{n,1}) & E = 1 \\
                                    \mathrm{softmax}(\ell_{n,\cdot}) & E > 1 \end{cases}

    where :math:`r` is the upper level's (task level's) output (``residual``; omitted when None).
    HoME adds it so that the deeper hierarchy gets a short gradient path back to the experts
    below, easing underfitting of the task-level experts.

    **UNVERIFIED:** the exact self-gate formula is not known (no official code, paper body not
    readable); this residual, sigmoid-or-softmax form is this library's reading of the abstract and
    the unofficial re-implementation, and may differ from the paper.

    Parameters
    ----------
    expert_outputs : array (N, E, d)
        Outputs of the lower level's experts.
    gate_logits : array (N, E)
        Self-gate logits (typically :math:`x W`).
    residual : array (N, d), optional
        The upper level's output to add to.
    %(xp)s

    Returns
    -------
    array (N, d)
        float32.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> outputs = xp.asarray([[[2.0, 4.0]]])  # one expert: the weight is sigmoid(0) = 1/2
    >>> mr.multitask.self_gate(outputs, xp.zeros((1, 1)), residual=xp.ones((1, 2)))
    Array([[2., 3.]], dtype=array_api_strict.float32)
    """
    arrays = [expert_outputs, gate_logits] + ([residual] if residual is not None else [])
    xp = namespace(*arrays, xp=xp)
    outputs = float_array(expert_outputs, "expert_outputs", ndim=(3,), xp=xp)
    logits = float_array(gate_logits, "gate_logits", ndim=(2,), xp=xp)
    check_shape(logits, "gate_logits", tuple(outputs.shape[:2]))
    if outputs.shape[1] == 1:
        weights = sigmoid(logits, xp=xp)
    else:
        weights = softmax(logits, xp=xp)
    gated = xp.matmul(weights[:, None, :], outputs)[:, 0, :]
    if residual is None:
        return gated
    upper = float_array(residual, "residual", ndim=(2,), xp=xp)
    check_shape(upper, "residual", tuple(gated.shape))
    return upper + gated


@fill_doc
def expert_normalization(
    expert_outputs: Array,
    *,
    scale: Array | None = None,
    shift: Array | None = None,
    mean: Array | None = None,
    variance: Array | None = None,
    eps: float = 1e-5,
    activation: Literal["swish", "relu", "identity"] = "swish",
    xp: Any = None,
) -> Array:
    r"""HoME's expert normalisation: batch-normalise each expert's output, then Swish.

    .. math::

       \hat y = \gamma \odot \frac{y - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
       \mathrm{out} = \hat y \cdot \sigma(\hat y) \;(\text{Swish}),

    with :math:`\mu, \sigma^2` the per-feature mean and population variance over the ``N`` rows
    (training-mode batch norm), or the given running ``mean`` and ``variance`` (inference mode).
    Normalising every expert to the same distribution, and Swish in place of ReLU (no dead zero
    region), is HoME's fix for expert collapse.

    UNVERIFIED: "Expert normalization & Swish" is named in the abstract; the exact placement
    (``Swish(BatchNorm(MLP(v)))``) is from the unofficial re-implementation.

    Parameters
    ----------
    expert_outputs : array (N, E, d) or (N, d)
        Expert pre-activations (the experts' last linear layer), for all experts or one.
    scale, shift : array, optional
        :math:`\gamma` and :math:`\beta`, broadcastable to ``expert_outputs.shape[1:]``; 1 and 0
        when None.
    mean, variance : array, optional
        Running statistics of shape ``expert_outputs.shape[1:]``; give both or neither.
    eps : float
        :math:`\epsilon > 0`; 1e-5 as ``torch.nn.BatchNorm1d``.
    activation : {"swish", "relu", "identity"}
        Applied after normalisation: Swish (HoME), ReLU (the MMoE baseline), or none.
    %(xp)s

    Returns
    -------
    array, shape of ``expert_outputs``
        float32.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> y = xp.asarray([[1.0], [3.0]])
    >>> mr.multitask.expert_normalization(y, activation="identity", eps=0.0)
    Array([[-1.],
           [ 1.]], dtype=array_api_strict.float32)
    """
    if activation not in ("swish", "relu", "identity"):
        raise ValueError(f"activation must be 'swish', 'relu' or 'identity', got {activation!r}")
    if (mean is None) != (variance is None):
        raise ValueError("give both mean and variance (running statistics) or neither")
    optional = [a for a in (scale, shift, mean, variance) if a is not None]
    xp = namespace(expert_outputs, *optional, xp=xp)
    outputs = float_array(expert_outputs, "expert_outputs", ndim=(2, 3), xp=xp)
    epsilon = check_real(eps, "eps")
    if epsilon < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if outputs.shape[0] == 0:
        raise ValueError("expert_outputs must hold at least one row")
    if mean is None or variance is None:
        centre = xp.mean(outputs, axis=0)
        spread = xp.mean((outputs - centre) ** 2, axis=0)
    else:
        centre = float_array(mean, "mean", ndim=(outputs.ndim - 1,), xp=xp)
        spread = float_array(variance, "variance", ndim=(outputs.ndim - 1,), xp=xp)
        check_shape(centre, "mean", tuple(outputs.shape[1:]))
        check_shape(spread, "variance", tuple(outputs.shape[1:]))
    normalised = (outputs - centre) / xp.sqrt(spread + epsilon)
    ranks = tuple(range(outputs.ndim))  # broadcastable to one row: rank below the outputs'
    if scale is not None:
        normalised = normalised * float_array(scale, "scale", ndim=ranks, xp=xp)
    if shift is not None:
        normalised = normalised + float_array(shift, "shift", ndim=ranks, xp=xp)
    if activation == "swish":
        return normalised * sigmoid(normalised, xp=xp)
    if activation == "relu":
        return xp.maximum(normalised, xp.zeros_like(normalised))
    return normalised


def expert_collapse(activations: Array, *, atol: float = 0.0, xp: Any = None) -> dict[str, Array]:
    r"""Diagnostics of expert collapse: dead activations and unequal output scales per expert.

    HoME's abstract reports experts whose outputs are distributed very differently, some with
    over 90 % zero activations after ReLU, which keeps the gates from weighing experts fairly.

    Parameters
    ----------
    activations : array (N, E, d)
        Every expert's (post-activation) output for ``N`` rows.
    atol : float
        An activation counts as zero when :math:`|a| \le` ``atol`` (0: exactly zero).
    xp : namespace, optional
        Array namespace; inferred from ``activations`` when None.

    Returns
    -------
    dict of str to array
        - ``zero_share`` (E,) float32: share of expert e's ``N * d`` activations that are zero.
        - ``mean`` (E,) float32: mean of expert e's activations.
        - ``std`` (E,) float32: their (population) standard deviation.
        - ``scale_spread`` () float32: ``max(std) / min(std)``, 1 when every expert has the same
          scale; ``inf`` when some expert is constant and another is not.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> acts = xp.asarray([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 3.0], [0.0, 4.0]]])  # (2, 2, 2)
    >>> mr.multitask.expert_collapse(acts)["zero_share"]
    Array([0.25, 0.75], dtype=array_api_strict.float32)
    """
    xp = namespace(activations, xp=xp)
    values = float_array(activations, "activations", ndim=(3,), xp=xp)
    tolerance = check_real(atol, "atol")
    if tolerance < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    if values.shape[0] * values.shape[2] == 0:
        raise ValueError("activations must hold at least one row and one feature")
    zero = xp.astype(xp.abs(values) <= tolerance, xp.float32)
    zero_share = xp.mean(xp.mean(zero, axis=2), axis=0)
    per_expert = xp.permute_dims(values, (1, 0, 2))
    per_expert = xp.reshape(per_expert, (per_expert.shape[0], -1))
    mean = xp.mean(per_expert, axis=1)
    std = xp.sqrt(xp.mean((per_expert - mean[:, None]) ** 2, axis=1))
    largest, smallest = xp.max(std), xp.min(std)
    ratio = largest / xp.where(smallest > 0, smallest, xp.ones_like(smallest))
    inf = xp.full_like(ratio, xp.inf)
    one = xp.ones_like(ratio)
    spread = xp.where(smallest > 0, ratio, xp.where(largest > 0, inf, one))
    return {"zero_share": zero_share, "mean": mean, "std": std, "scale_spread": spread}


def expert_degradation(gates: Array, *, xp: Any = None) -> dict[str, Array]:
    r"""Diagnostics of expert degradation: how much of each expert's gate mass one task holds.

    With :math:`m_{t,e} = \frac{1}{N}\sum_n g_{n,t,e}` task :math:`t`'s mean gate weight on
    expert :math:`e`, the share of task :math:`t` is :math:`s_{t,e} = m_{t,e} / \sum_{t'}
    m_{t',e}`. A shared expert whose largest share is near 1 is "occupied by only one task"
    (HoME's abstract): it has degenerated into a specific expert. Read the shared experts'
    columns; a specific expert's dominance is 1 by construction.

    Parameters
    ----------
    gates : array (N, tasks, E)
        Gate weights, from :func:`multi_gate` or any MMoE/PLE-style model.
    xp : namespace, optional
        Array namespace; inferred from ``gates`` when None.

    Returns
    -------
    dict of str to array
        - ``mass`` (tasks, E) float32: :math:`m_{t,e}`.
        - ``share`` (tasks, E) float32: :math:`s_{t,e}` (0 for an expert no task uses).
        - ``dominance`` (E,) float32: :math:`\max_t s_{t,e}`; ``1 / tasks`` at perfect sharing.
        - ``dominant_task`` (E,) int32: the task holding it (lower index on ties; -1 for an
          expert no task uses).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> gates = xp.asarray([[[0.5, 0.5], [0.0, 1.0]]])  # task 1 only uses expert 1
    >>> mr.multitask.expert_degradation(gates)["dominance"]
    Array([1.       , 0.6666...], dtype=array_api_strict.float32)
    """
    xp = namespace(gates, xp=xp)
    weights = float_array(gates, "gates", ndim=(3,), xp=xp)
    if weights.shape[0] == 0:
        raise ValueError("gates must hold at least one row")
    mass = xp.mean(weights, axis=0)
    total = xp.sum(mass, axis=0)
    used = total > 0
    share = mass / xp.where(used, total, xp.ones_like(total))[None, :]
    dominant = xp.astype(xp.argmax(share, axis=0), xp.int32)
    dominant = xp.where(used, dominant, xp.full_like(dominant, -1))
    return {
        "mass": mass,
        "share": share,
        "dominance": xp.max(share, axis=0),
        "dominant_task": dominant,
    }


@fill_doc
def expert_underfitting(gates: Array, specific: Array, *, xp: Any = None) -> dict[str, Array]:
    r"""Diagnostics of expert underfitting: each task's gate mass on its own experts.

    HoME's abstract reports data-sparse tasks that ignore their specific experts and put their
    weight on shared ones. For task :math:`t` with own experts :math:`S_t`:
    ``specific_mass`` :math:`= \frac{1}{N}\sum_n \sum_{e \in S_t} g_{n,t,e}` and ``shared_mass``
    the mean mass on every other expert. Compare across tasks, against each task's positive rate.

    Parameters
    ----------
    gates : array (N, tasks, E)
        Gate weights.
    specific : array (tasks, E) of bool
        Each task's own experts (the second output of :func:`hierarchy_mask`).
    %(xp)s

    Returns
    -------
    dict of str to array
        - ``specific_mass`` (tasks,) float32.
        - ``shared_mass`` (tasks,) float32 (the two sum to 1 for softmax gates).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> gates = xp.asarray([[[0.9, 0.1, 0.0], [0.8, 0.0, 0.2]]])  # expert 0 shared
    >>> specific = xp.asarray([[False, True, False], [False, False, True]])
    >>> mr.multitask.expert_underfitting(gates, specific)["specific_mass"]
    Array([0.1, 0.2], dtype=array_api_strict.float32)
    """
    xp = namespace(gates, specific, xp=xp)
    weights = float_array(gates, "gates", ndim=(3,), xp=xp)
    if weights.shape[0] == 0:
        raise ValueError("gates must hold at least one row")
    own = bool_array(specific, "specific", shape=tuple(weights.shape[1:]), xp=xp)
    mass = xp.mean(weights, axis=0)
    zero = xp.zeros_like(mass)
    return {
        "specific_mass": xp.sum(xp.where(own, mass, zero), axis=1),
        "shared_mass": xp.sum(xp.where(own, zero, mass), axis=1),
    }


def _categories(task_category: Any) -> list[int]:
    if is_array_api_obj(task_category):
        import numpy as np

        if task_category.ndim != 1:
            raise ValueError(f"task_category must be 1-D, got shape {tuple(task_category.shape)}")
        values = host_copy(task_category, "task_category", "hierarchy_mask")
        if not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"task_category must hold integers, got {values.dtype}")
        categories = [int(v) for v in values]
    else:
        sequence = isinstance(task_category, Sequence | range)
        if isinstance(task_category, str | bytes) or not sequence:
            raise TypeError("task_category must be a sequence of ints or an int array")
        categories = []
        for position, value in enumerate(task_category):
            categories.append(check_int(value, f"task_category[{position}]"))
    if not categories:
        raise ValueError("task_category must name at least one task")
    if min(categories) < 0:
        raise ValueError("task_category must be >= 0")
    return categories
