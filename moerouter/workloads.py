r"""Synthetic router logits with named, documented distributions, for studies without a model.

Every generator is a pure function of its seed: the same arguments give the same float32
values on every backend (they are drawn on the host with NumPy's PCG64, then copied once to the
backend and device asked for with ``xp=``/``device=`` or ``like=``). Each returns router logits
of shape ``(T, E)``; feed them to any policy.

The common ingredient is Gumbel noise :math:`G_{t,e} = -\log X_{t,e}` with
:math:`X_{t,e} \sim \mathrm{Exp}(1)` i.i.d. (the standard Gumbel distribution). By the Gumbel-max
trick, if the logits are :math:`\ell_{t,e} = \log p_{t,e} + G_{t,e}` then a token's top-1 expert
is distributed exactly as :math:`p_{t,\cdot}`, and its top-k is a draw of k experts without
replacement with probabilities proportional to :math:`p_{t,\cdot}` (Gumbel-top-k; Kool et al.
2019). Each generator below states its :math:`\log p_{t,e}`.

Two seeds: ``seed`` drives the per-token noise (and anything that varies per token: topics,
vocabulary draws, spikes); ``structure_seed`` drives what a trained model keeps from step to
step (which experts are popular, the topic and vocabulary preference tables). It defaults to
``seed``. A seed is an int or a sequence of ints (``(seed, layer, step)``), as for
:func:`numpy.random.default_rng`.

=======================  =================================================================
name                     distribution
=======================  =================================================================
``uniform``              every expert equally likely
``zipf``                 expert popularity :math:`\propto \mathrm{rank}^{-s}`
``bursty``               per-sequence topics that switch at random positions
``token_correlated``     a token's experts depend on its (Zipf-distributed) token id
``hot_spikes``           experts that turn hot for a window of time
=======================  =================================================================

:func:`from_spec` parses the command line's ``name:value`` form (``zipf:1.2``).

One module on purpose (about 580 lines, half of them docstrings and examples): the five
generators follow the same seeding rules (one ``SeedSequence`` per draw, the structure per
``structure_seed``) and share the Gumbel and placement helpers, and :data:`WORKLOADS` and
:func:`from_spec` name them all; split, a generator would sit away from the rules it must keep.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as device_of

from moerouter._typing import Array
from moerouter._validation import check_int_at_least as _check_int

__all__ = [
    "WORKLOADS",
    "bursty",
    "from_spec",
    "hot_spikes",
    "token_correlated",
    "uniform",
    "zipf",
]

Seed = int | Sequence[int]


# --------------------------------------------------------------------------------------------
# Shared pieces


def _check_float(value: object, name: str, *, minimum: float, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not np.isfinite(number) or number < minimum or (not inclusive and number == minimum):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value}")
    return number


def _seed_sequence(seed: object, name: str) -> np.random.SeedSequence:
    entropy = [seed] if isinstance(seed, int | np.integer) else seed
    if (
        isinstance(seed, bool)
        or isinstance(entropy, str | bytes)
        or not isinstance(entropy, Sequence)
        or not entropy
        or any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in entropy)
        or any(v < 0 for v in entropy)
    ):
        raise TypeError(f"{name} must be an int >= 0 or a non-empty sequence of them, got {seed!r}")
    return np.random.SeedSequence([int(v) for v in entropy])


def _streams(seed: Seed, count: int) -> list[np.random.Generator]:
    """``count`` independent generators from one seed (SeedSequence.spawn: fixed per seed)."""
    children = _seed_sequence(seed, "seed").spawn(count)
    return [np.random.Generator(np.random.PCG64(child)) for child in children]


def _structure_stream(seed: Seed, structure_seed: Seed | None) -> np.random.Generator:
    """The generator of the structure (popularity order, preference tables).

    Its own spawn key keeps it independent of the noise streams even when both come from the
    same seed.
    """
    name = "seed" if structure_seed is None else "structure_seed"
    root = _seed_sequence(seed if structure_seed is None else structure_seed, name)
    child = np.random.SeedSequence(root.entropy, spawn_key=(_STRUCTURE_KEY,))
    return np.random.Generator(np.random.PCG64(child))


_STRUCTURE_KEY = 1_000_003  # far from the spawn keys 0, 1, ... that _streams hands out


def _gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard Gumbel noise, float32: ``-log X`` with ``X ~ Exp(1)`` (ziggurat, float32)."""
    draws = rng.standard_exponential(shape, dtype=np.float32)
    # X is 0 with probability ~2^-32 per draw: clamp so the noise stays finite.
    np.maximum(draws, np.finfo(np.float32).tiny, out=draws)
    np.log(draws, out=draws)
    np.negative(draws, out=draws)
    return draws


def _zipf_log_popularity(num_items: int, exponent: float, order: np.ndarray | None) -> np.ndarray:
    r"""``log p_i`` with :math:`p_i \propto r_i^{-s}`, ``r_i = 1 + order[i]`` (1 = most popular)."""
    ranks = np.arange(1, num_items + 1, dtype=np.float64)
    if order is not None:
        ranks = ranks[order]
    log_weights = -exponent * np.log(ranks)
    log_weights -= np.logaddexp.reduce(log_weights)
    return log_weights


def _check_sizes(num_tokens: object, num_experts: object) -> tuple[int, int]:
    return _check_int(num_tokens, "num_tokens", 0), _check_int(num_experts, "num_experts", 1)


def _place(values: np.ndarray, xp: Any, like: Array, device: Any) -> Array:
    """``values`` on the asked backend and device (NumPy when none is asked)."""
    if like is not None:
        if xp is not None:
            raise TypeError("give either xp= or like=, not both")
        xp = array_namespace(like)
        if device is None:
            device = device_of(like)
    if xp is None:
        if device not in (None, "cpu"):
            raise ValueError(f"device={device!r} needs xp= or like= (NumPy arrays live on the cpu)")
        return values
    return xp.asarray(values, device=device)


# --------------------------------------------------------------------------------------------
# The generators


def uniform(
    num_tokens: int,
    num_experts: int,
    *,
    seed: Seed = 0,
    structure_seed: Seed | None = None,
    xp: Any = None,
    like: Array = None,
    device: Any = None,
) -> Array:
    r"""Every expert equally likely: :math:`\ell_{t,e} = G_{t,e}`.

    A token's top-1 is uniform over the ``E`` experts and its top-k a uniform k-subset.

    Parameters
    ----------
    num_tokens, num_experts : int
        ``T >= 0`` and ``E >= 1``.
    seed : int or sequence of int
        Drives the noise.
    structure_seed : int or sequence of int, optional
        Unused (kept so every generator has the same signature).
    xp : namespace, optional
        Backend of the result (NumPy when neither ``xp`` nor ``like`` is given).
    like : array, optional
        Take the backend and device of this array.
    device : optional
        Device on that backend.

    Returns
    -------
    array (T, E) float32

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from moerouter import workloads
    >>> workloads.uniform(3, 4, seed=1, xp=xp).shape
    (3, 4)
    """
    num_tokens, num_experts = _check_sizes(num_tokens, num_experts)
    (noise,) = _streams(seed, 1)
    _structure_stream(seed, structure_seed)  # checks it, for one signature across generators
    return _place(_gumbel(noise, (num_tokens, num_experts)), xp, like, device)


def zipf(
    num_tokens: int,
    num_experts: int,
    *,
    exponent: float = 1.2,
    seed: Seed = 0,
    structure_seed: Seed | None = None,
    xp: Any = None,
    like: Array = None,
    device: Any = None,
) -> Array:
    r"""Zipf-skewed expert popularity.

    .. math::

        \ell_{t,e} = \log p_e + G_{t,e}, \qquad
        p_e = \frac{r_e^{-s}}{\sum_{j=1}^{E} j^{-s}}, \qquad r_e = 1 + \pi(e),

    with :math:`\pi` a permutation of the experts drawn from ``structure_seed`` (so the popular
    experts are not always the low indices) and :math:`s` the ``exponent``. A token's top-1 is
    expert :math:`e` with probability exactly :math:`p_e`; ``exponent=0`` is :func:`uniform`.
    The most popular expert takes :math:`1/H_{E,s}` of the first choices
    (:math:`H_{E,s} = \sum_j j^{-s}`): 0.18 for ``E = 256``, ``s = 1``.

    Parameters
    ----------
    num_tokens, num_experts : int
        ``T >= 0`` and ``E >= 1``.
    exponent : float
        :math:`s \geq 0`.
    seed : int or sequence of int
        Drives the noise.
    structure_seed : int or sequence of int, optional
        Drives :math:`\pi`; ``seed`` when omitted.
    xp, like, device
        Backend and device of the result, as in :func:`uniform`.

    Returns
    -------
    array (T, E) float32

    Examples
    --------
    >>> import numpy as np
    >>> from moerouter import workloads
    >>> logits = workloads.zipf(20000, 8, exponent=1.0, seed=0)
    >>> shares = np.bincount(logits.argmax(axis=1), minlength=8) / 20000
    >>> round(float(shares.max()), 2)    # 1 / (1 + 1/2 + ... + 1/8) = 0.368
    0.37
    """
    num_tokens, num_experts = _check_sizes(num_tokens, num_experts)
    exponent = _check_float(exponent, "exponent", minimum=0.0)
    (noise,) = _streams(seed, 1)
    structure = _structure_stream(seed, structure_seed)
    order = structure.permutation(num_experts)
    log_p = _zipf_log_popularity(num_experts, exponent, order).astype(np.float32)
    values = _gumbel(noise, (num_tokens, num_experts))
    values += log_p
    return _place(values, xp, like, device)


def bursty(
    num_tokens: int,
    num_experts: int,
    *,
    sequence_length: int = 512,
    num_topics: int = 16,
    switch_probability: float = 0.02,
    topic_scale: float = 2.0,
    seed: Seed = 0,
    structure_seed: Seed | None = None,
    xp: Any = None,
    like: Array = None,
    device: Any = None,
) -> Array:
    r"""Per-sequence topic drift: experts favoured by a topic, topics that switch in bursts.

    Tokens form sequences of ``sequence_length`` (token ``t`` is at position
    ``t % sequence_length`` of sequence ``t // sequence_length``; the last may be shorter).
    Each sequence walks a Markov chain over ``Z = num_topics`` topics:

    .. math::

        z_0 \sim \mathcal{U}\{1..Z\}, \qquad
        z_{n+1} = \begin{cases} z_n & \text{with probability } 1 - q \\
                               \mathcal{U}\{1..Z\} & \text{with probability } q \end{cases}

    (``q = switch_probability``; a switch may redraw the same topic), and

    .. math::

        \ell_{t,e} = \sigma\,\mu_{z_t,e} + G_{t,e}, \qquad \mu_{z,e} \sim \mathcal{N}(0, 1),

    with the topic table :math:`\mu` drawn from ``structure_seed`` and :math:`\sigma` the
    ``topic_scale``. Topics last :math:`1/q` tokens on average, so loads are stable within a
    burst and shift between bursts; averaged over many sequences every expert is equally likely.

    Parameters
    ----------
    num_tokens, num_experts : int
        ``T >= 0`` and ``E >= 1``.
    sequence_length : int
        Tokens per sequence, ``>= 1``.
    num_topics : int
        ``Z >= 1``.
    switch_probability : float
        ``q`` in ``[0, 1]``.
    topic_scale : float
        :math:`\sigma \geq 0`: how strongly a topic favours its experts.
    seed : int or sequence of int
        Drives the noise and the topic chains.
    structure_seed : int or sequence of int, optional
        Drives the topic table :math:`\mu`; ``seed`` when omitted.
    xp, like, device
        Backend and device of the result, as in :func:`uniform`.

    Returns
    -------
    array (T, E) float32

    Examples
    --------
    >>> from moerouter import workloads
    >>> logits = workloads.bursty(8, 4, sequence_length=4, switch_probability=0.0)
    >>> logits.shape, str(logits.dtype)
    ((8, 4), 'float32')
    """
    num_tokens, num_experts = _check_sizes(num_tokens, num_experts)
    sequence_length = _check_int(sequence_length, "sequence_length", 1)
    num_topics = _check_int(num_topics, "num_topics", 1)
    switch = _check_float(switch_probability, "switch_probability", minimum=0.0)
    if switch > 1.0:
        raise ValueError(f"switch_probability must be <= 1, got {switch_probability}")
    scale = _check_float(topic_scale, "topic_scale", minimum=0.0)
    noise, chains = _streams(seed, 2)
    structure = _structure_stream(seed, structure_seed)
    topics = structure.standard_normal((num_topics, num_experts), dtype=np.float32) * scale

    position = np.arange(num_tokens) % sequence_length
    switches = chains.random(num_tokens) < switch
    draws = chains.integers(0, num_topics, size=num_tokens)
    # A token starts a new topic at position 0 or at a switch: the topic of every token is the
    # draw made at the last such start, found with a running maximum of start indices.
    starts = (position == 0) | switches
    last_start = np.maximum.accumulate(np.where(starts, np.arange(num_tokens), 0))
    topic = draws[last_start]

    values = _gumbel(noise, (num_tokens, num_experts))
    values += topics[topic]
    return _place(values, xp, like, device)


def token_correlated(
    num_tokens: int,
    num_experts: int,
    *,
    vocab_size: int = 32000,
    token_exponent: float = 1.0,
    strength: float = 3.0,
    token_ids: Array = None,
    seed: Seed = 0,
    structure_seed: Seed | None = None,
    xp: Any = None,
    like: Array = None,
    device: Any = None,
) -> Array:
    r"""A token's experts depend on its token id, as trained routers route by token (hash-like).

    Token ids follow a Zipf law over the vocabulary (id ``v`` has probability
    :math:`\propto (v + 1)^{-a}`, ``a = token_exponent``: natural text has ``a`` near 1), unless
    ``token_ids`` are given. Each id has a fixed preference vector, so repeated tokens route
    alike:

    .. math::

        \ell_{t,e} = \lambda\,\mu_{v_t,e} + G_{t,e}, \qquad \mu_{v,e} \sim \mathcal{N}(0, 1),

    with :math:`\mu` (``vocab_size x E``) drawn from ``structure_seed`` and :math:`\lambda` the
    ``strength``: 0 is :func:`uniform`, large values make each id's experts nearly
    deterministic (hash routing). Expert loads then inherit the skew of the token frequencies.

    Parameters
    ----------
    num_tokens, num_experts : int
        ``T >= 0`` and ``E >= 1``.
    vocab_size : int
        ``V >= 1``.
    token_exponent : float
        ``a >= 0``.
    strength : float
        :math:`\lambda \geq 0`.
    token_ids : array (T,) int, optional
        Use these ids (in ``[0, V)``, any backend; read on the host) instead of drawing them.
    seed : int or sequence of int
        Drives the noise and the token draws.
    structure_seed : int or sequence of int, optional
        Drives :math:`\mu`; ``seed`` when omitted.
    xp, like, device
        Backend and device of the result, as in :func:`uniform`.

    Returns
    -------
    array (T, E) float32

    Examples
    --------
    >>> import numpy as np
    >>> from moerouter import workloads
    >>> logits = workloads.token_correlated(2, 8, token_ids=np.array([5, 5]), strength=50.0)
    >>> bool(logits[0].argmax() == logits[1].argmax())    # the same token, the same expert
    True
    """
    num_tokens, num_experts = _check_sizes(num_tokens, num_experts)
    vocab_size = _check_int(vocab_size, "vocab_size", 1)
    token_exponent = _check_float(token_exponent, "token_exponent", minimum=0.0)
    strength = _check_float(strength, "strength", minimum=0.0)
    noise, draws = _streams(seed, 2)
    structure = _structure_stream(seed, structure_seed)
    if token_ids is None:
        cumulative = np.cumsum(np.exp(_zipf_log_popularity(vocab_size, token_exponent, None)))
        ids = np.searchsorted(cumulative, draws.random(num_tokens) * cumulative[-1], side="right")
        ids = np.minimum(ids, vocab_size - 1)
    else:
        ids = _host_ints(token_ids, "token_ids")
        if ids.shape != (num_tokens,):
            raise ValueError(f"token_ids must have shape ({num_tokens},), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token_ids must lie in [0, vocab_size = {vocab_size})")
    preferences = structure.standard_normal((vocab_size, num_experts), dtype=np.float32)
    values = _gumbel(noise, (num_tokens, num_experts))
    values += np.float32(strength) * preferences[ids]
    return _place(values, xp, like, device)


def hot_spikes(
    num_tokens: int,
    num_experts: int,
    *,
    num_windows: int = 8,
    spike_probability: float = 0.02,
    boost: float = 3.0,
    exponent: float = 0.0,
    seed: Seed = 0,
    structure_seed: Seed | None = None,
    xp: Any = None,
    like: Array = None,
    device: Any = None,
) -> Array:
    r"""Experts that turn hot for a while: load spikes over time on a (Zipf) base.

    The ``T`` tokens, in time order, fall into ``num_windows`` equal windows (token ``t`` in
    window :math:`w_t = \lfloor t \cdot W / T \rfloor`). In each window each expert is hot
    independently with probability ``spike_probability`` (:math:`h_{w,e} \in \{0, 1\}`):

    .. math::

        \ell_{t,e} = \log p_e + b\,h_{w_t,e} + G_{t,e},

    with :math:`p` the :func:`zipf` popularity of ``exponent`` (uniform at 0, its permutation
    from ``structure_seed``) and :math:`b` the ``boost``: a hot expert's odds of being chosen
    grow by :math:`e^b` (20x at ``b = 3``) for that window.

    Parameters
    ----------
    num_tokens, num_experts : int
        ``T >= 0`` and ``E >= 1``.
    num_windows : int
        ``W >= 1``.
    spike_probability : float
        In ``[0, 1]``.
    boost : float
        :math:`b \geq 0`.
    exponent : float
        Zipf exponent of the base popularity, ``>= 0``.
    seed : int or sequence of int
        Drives the noise and the spikes.
    structure_seed : int or sequence of int, optional
        Drives the base popularity's permutation; ``seed`` when omitted.
    xp, like, device
        Backend and device of the result, as in :func:`uniform`.

    Returns
    -------
    array (T, E) float32

    Examples
    --------
    >>> from moerouter import workloads
    >>> workloads.hot_spikes(6, 4, num_windows=2, spike_probability=1.0).shape
    (6, 4)
    """
    num_tokens, num_experts = _check_sizes(num_tokens, num_experts)
    num_windows = _check_int(num_windows, "num_windows", 1)
    spike = _check_float(spike_probability, "spike_probability", minimum=0.0)
    if spike > 1.0:
        raise ValueError(f"spike_probability must be <= 1, got {spike_probability}")
    boost = _check_float(boost, "boost", minimum=0.0)
    exponent = _check_float(exponent, "exponent", minimum=0.0)
    noise, spikes = _streams(seed, 2)
    structure = _structure_stream(seed, structure_seed)
    order = structure.permutation(num_experts)
    log_p = _zipf_log_popularity(num_experts, exponent, order).astype(np.float32)
    hot = spikes.random((num_windows, num_experts)) < spike
    window = np.arange(num_tokens, dtype=np.int64) * num_windows // max(num_tokens, 1)
    values = _gumbel(noise, (num_tokens, num_experts))
    values += log_p
    values += np.float32(boost) * hot[window].astype(np.float32)
    return _place(values, xp, like, device)


def _host_ints(array: Array, name: str) -> np.ndarray:
    from moerouter.traces import to_numpy

    values = to_numpy(array)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got {values.dtype}")
    return values.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Names for the command line

#: name -> (generator, its first parameter: what ``name:value`` sets)
WORKLOADS: dict[str, tuple[Callable[..., Array], str | None]] = {
    "uniform": (uniform, None),
    "zipf": (zipf, "exponent"),
    "bursty": (bursty, "switch_probability"),
    "token_correlated": (token_correlated, "strength"),
    "hot_spikes": (hot_spikes, "spike_probability"),
}


def from_spec(spec: str) -> Callable[..., Array]:
    """A generator with its parameters bound, from ``name``, ``name:value`` or ``name:k=v,...``.

    ``value`` sets the generator's main parameter (``zipf:1.2`` is ``exponent=1.2``,
    ``bursty:0.05`` ``switch_probability``, ``token_correlated:3`` ``strength``,
    ``hot_spikes:0.1`` ``spike_probability``); ``k=v`` pairs set any keyword parameter. Numbers
    are parsed as int when they look like one, else as float.

    Examples
    --------
    >>> from moerouter import workloads
    >>> workloads.from_spec("zipf:1.2").keywords
    {'exponent': 1.2}
    >>> workloads.from_spec("bursty:sequence_length=128,num_topics=4").keywords
    {'sequence_length': 128, 'num_topics': 4}
    """
    if not isinstance(spec, str):
        raise TypeError(f"a workload spec must be a str, got {type(spec).__name__}")
    name, _, rest = spec.partition(":")
    name = name.strip().replace("-", "_")
    if name not in WORKLOADS:
        raise ValueError(
            f"unknown workload {name!r} in {spec!r}; choose from {', '.join(WORKLOADS)}"
        )
    generator, main = WORKLOADS[name]
    keywords: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, text = item.partition("=")
        if not equals:
            if main is None:
                raise ValueError(f"workload {name!r} takes no value, got {spec!r}")
            key, text = main, item
        key = key.strip()
        if key in _NOT_IN_SPECS or key not in (generator.__kwdefaults__ or {}):
            raise ValueError(f"workload {name!r} has no parameter {key!r} (in {spec!r})")
        keywords[key] = _number(text.strip(), spec)
    partial = functools.partial(generator, **keywords)
    # Check the values now, on an empty draw, so a bad spec fails before any work.
    partial(0, 1)
    return partial


_NOT_IN_SPECS = ("seed", "structure_seed", "xp", "like", "device", "token_ids")


def _number(text: str, spec: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number (in {spec!r})") from None
