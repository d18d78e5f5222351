"""Recording and replay: the :func:`record` block, the :func:`traced` wrapper, :func:`replay`
and :func:`record_transformers`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from moerouter._typing import Array
from moerouter.routing import Routing
from moerouter.traces._record import TraceRecord, to_numpy
from moerouter.traces._trace import Trace, save

__all__ = ["Recorder", "TracedPolicy", "record", "record_transformers", "replay", "traced"]

_ACTIVE: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "moerouter_trace_recorder", default=None
)


class Recorder:
    """Collects records while a :func:`record` block is active; ``recorder.trace`` holds them.

    Parameters
    ----------
    probs, logits : bool
        Keep the router probabilities / the logits of every recorded call (each ``T x E'``
        float32: large for big runs; logits are needed to replay through another policy).
    metadata : dict, optional
        Stored with the trace.
    """

    def __init__(
        self, *, probs: bool = False, logits: bool = False, metadata: dict[str, Any] | None = None
    ) -> None:
        self.probs = bool(probs)
        self.logits = bool(logits)
        self.trace = Trace(metadata=dict(metadata or {}))
        self._calls: dict[tuple[str, int], int] = {}

    def add(
        self,
        routing: Routing,
        *,
        layer: int,
        name: str = "",
        step: int | None = None,
        logits: Array = None,
        sequence: Array = None,
        position: Array = None,
    ) -> TraceRecord:
        """Record one routing; ``step`` defaults to the count of earlier calls of this layer."""
        key = (name, int(layer))
        if step is None:
            step = self._calls.get(key, 0)
        self._calls[key] = max(self._calls.get(key, 0), step + 1)
        rec = TraceRecord.from_routing(
            routing,
            layer=layer,
            step=step,
            name=name,
            logits=logits if self.logits else None,
            probs=self.probs,
            sequence=sequence,
            position=position,
        )
        self.trace.records.append(rec)
        return rec

    def save(self, path: str | os.PathLike[str], *, compress: bool = False) -> None:
        """Write what was recorded so far (:func:`save`)."""
        save(self.trace, path, compress=compress)


@contextlib.contextmanager
def record(
    *, probs: bool = False, logits: bool = False, metadata: dict[str, Any] | None = None
) -> Iterator[Recorder]:
    """Record every :func:`traced` policy call made inside the ``with`` block.

    Parameters
    ----------
    probs, logits : bool
        Also keep the probabilities / logits of each call (see :class:`Recorder`).
    metadata : dict, optional
        JSON-serialisable facts stored with the trace.

    Yields
    ------
    Recorder
        ``recorder.trace`` is the :class:`Trace`; ``recorder.save(path)`` writes it.

    Examples
    --------
    >>> import numpy as np
    >>> import moerouter as mr
    >>> from moerouter import traces
    >>> router = traces.traced(mr.TopK(num_experts=4, k=2), layer=0)
    >>> logits = np.zeros((3, 4), dtype=np.float32)
    >>> with traces.record() as recorder:
    ...     routing = router(logits)
    >>> routing = router(logits)            # outside the block: nothing is recorded
    >>> [(r.layer, r.step, r.num_tokens) for r in recorder.trace]
    [(0, 0, 3)]
    """
    recorder = Recorder(probs=probs, logits=logits, metadata=metadata)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


@dataclass(frozen=True)
class TracedPolicy:
    """A policy that records its calls inside :func:`record`; see :func:`traced`."""

    policy: Any
    layer: int
    name: str = ""

    def __call__(self, logits: Array, *args: Any, **kwargs: Any) -> Routing:
        """Route exactly as ``policy`` does; record the result when a recorder is active."""
        routing: Routing = self.policy(logits, *args, **kwargs)
        recorder = _ACTIVE.get()
        if recorder is not None:
            recorder.add(routing, layer=self.layer, name=self.name, logits=logits)
        return routing

    def __getattr__(self, attribute: str) -> Any:
        # num_experts, k, num_null, ...: the wrapper stands in for the policy everywhere.
        if attribute == "policy":
            raise AttributeError(attribute)
        return getattr(self.policy, attribute)


def traced(policy: Any, *, layer: int, name: str = "") -> TracedPolicy:
    """Wrap ``policy`` so that its calls inside :func:`record` are recorded as ``layer``.

    Outside a ``record`` block the wrapper only routes (one context-variable lookup per call).
    The wrapper forwards attribute reads (``num_experts``, ``k``, ...) to the policy, so it can
    replace it in a model. Inside ``jax.jit`` recording raises (values are not concrete).
    """
    if not callable(policy):
        raise TypeError(f"policy must be callable, got {type(policy).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")
    return TracedPolicy(policy, layer, str(name))


def replay(
    trace: Trace | Iterable[TraceRecord],
    policy: Any = None,
    *args: Any,
    xp: Any = None,
    like: Array = None,
    device: Any = None,
    **kwargs: Any,
) -> Iterator[Routing]:
    """Each record's routing: as recorded, or re-routed from its logits through ``policy``.

    Feed the routings to :func:`moerouter.make_plan`, the losses, :func:`moerouter.stats.summary`
    or :func:`moerouter.simulate.run`.

    Examples
    --------
    >>> import numpy as np
    >>> import moerouter as mr
    >>> from moerouter import traces
    >>> router = traces.traced(mr.TopK(num_experts=4, k=1), layer=0)
    >>> with traces.record(logits=True) as recorder:
    ...     _ = router(np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32))
    >>> [mr.make_plan(r).group_sizes.tolist() for r in traces.replay(recorder.trace)]
    [[0, 0, 0, 1]]
    >>> other = mr.TopK(num_experts=4, k=2)
    >>> [r.expert_ids.tolist() for r in traces.replay(recorder.trace, other)]
    [[3, 2]]
    """
    for rec in trace:
        if not isinstance(rec, TraceRecord):
            raise TypeError(f"trace must hold TraceRecords, got {type(rec).__name__}")
        if policy is None:
            yield rec.routing(xp=xp, like=like, device=device)
        else:
            yield rec.route(policy, *args, xp=xp, like=like, device=device, **kwargs)


@contextlib.contextmanager
def record_transformers(
    model: Any,
    *,
    probs: bool = False,
    logits: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Iterator[Recorder]:
    """Record every MoE block of a transformers model routed by moerouter during the block.

    The model must have been routed with
    ``moerouter_torch.integrations.transformers.route_with_moerouter``; its
    ``routing_statistics`` hook hands each block's routing over. Layers are numbered in the
    order the blocks first route (the forward order) and named by module path. Token metadata
    comes from the model call: a token's sequence is its batch row, its position the
    ``position_ids`` (or ``cache_position``) given, else its index in the row.

    Examples
    --------
    >>> with traces.record_transformers(model) as recorder:  # doctest: +SKIP
    ...     model(input_ids)
    >>> recorder.save("routing.npz")  # doctest: +SKIP
    """
    from moerouter_torch.integrations.transformers import routing_statistics

    recorder = Recorder(probs=probs, logits=logits, metadata=metadata)
    layers: dict[str, int] = {}
    call: dict[str, np.ndarray | None] = {"shape": None, "position": None}

    def before_forward(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if inputs is None and args:
            inputs = args[0]
        shape = tuple(getattr(inputs, "shape", ()))[:2]
        call["shape"] = np.asarray(shape) if len(shape) == 2 else None
        position = kwargs.get("position_ids")
        if position is None:
            position = kwargs.get("cache_position")
        call["position"] = None if position is None else to_numpy(position)

    def on_routing(name: str, routing: Routing, router_logits: Array) -> None:
        sequence = position = None
        shape = call["shape"]
        if shape is not None and int(shape[0] * shape[1]) == routing.num_tokens:
            rows, length = int(shape[0]), int(shape[1])
            sequence = np.repeat(np.arange(rows, dtype=np.int32), length)
            given = call["position"]
            if given is not None and given.size in (length, rows * length):
                position = np.broadcast_to(given.reshape(-1, length), (rows, length)).reshape(-1)
            else:
                position = np.tile(np.arange(length, dtype=np.int32), rows)
        layer = layers.setdefault(name, len(layers))
        recorder.add(
            routing,
            layer=layer,
            name=name,
            logits=router_logits,
            sequence=sequence,
            position=position,
        )

    hook = model.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        with routing_statistics(model, on_routing=on_routing):
            yield recorder
    finally:
        hook.remove()
