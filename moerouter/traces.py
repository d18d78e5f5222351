"""Routing traces: record what a router decided, save it, load it back and replay it.

A :class:`Trace` is a list of :class:`TraceRecord`, one per routing call (a layer at a step):
per assignment the expert ids, combine weights and raw choices, per token whether its logits
were finite and its metadata (sequence and position), optionally the router probabilities and
the logits. Everything is held as NumPy arrays on the host; :meth:`TraceRecord.routing` rebuilds
a :class:`moerouter.Routing` on any backend, bit for bit, and :meth:`TraceRecord.route` replays
the recorded logits through any policy.

Recording costs nothing when it is off. Wrap the policies you want recorded with
:func:`traced` (``router = traces.traced(mr.TopK(8, k=2), layer=3)``): the wrapper routes
exactly as the policy does, and only inside a ``with traces.record() as recorder:`` block does
it copy the routing to the host; outside, its whole cost is one context-variable lookup per
call. Policies that are not wrapped are never touched (no policy code checks a flag), and
:meth:`Recorder.add` records any routing by hand. The active recorder is a
:class:`contextvars.ContextVar`, so threads and asyncio tasks each see their own.
:func:`record_transformers` records a Hugging Face model routed by
``moerouter_torch.integrations.transformers`` through its ``routing_statistics`` hook.

The file format is NumPy ``.npz`` (no pickle): a JSON ``header`` with the format ``version``
(:data:`TRACE_VERSION`), free-form metadata and each record's static fields, then the record
arrays under ``"<index>.<field>"``. Expert and choice ids are stored as int16 when they fit and
token ids only for the expert layout (the token layout implies them); loading restores the
contract's int32. Logits are stored as float32, which is exactly what every policy computes
with (router math runs in float32; float16 and bfloat16 widen exactly).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj
from array_api_compat import device as device_of

from moerouter._arrays import host_copy
from moerouter._typing import Array
from moerouter._validation import check_routing
from moerouter.routing import Routing

__all__ = [
    "TRACE_VERSION",
    "Recorder",
    "Trace",
    "TraceRecord",
    "TracedPolicy",
    "concatenate",
    "load",
    "record",
    "record_transformers",
    "replay",
    "save",
    "to_numpy",
    "traced",
]


#: Version of the ``.npz`` layout written by :func:`save`; :func:`load` reads this and older.
TRACE_VERSION = 1

_ACTIVE: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "moerouter_trace_recorder", default=None
)


def to_numpy(array: Array) -> np.ndarray:
    """A host NumPy copy of any backend's array (bfloat16 becomes float32).

    Raises
    ------
    TypeError
        For a traced JAX array (inside ``jax.jit``): there are no values to copy yet.
    """
    try:
        return host_copy(array, "the array", "traces.to_numpy")
    except Exception as error:
        if "Tracer" in type(array).__name__ or "Tracer" in type(error).__name__:
            raise TypeError(
                "cannot copy a traced array to the host (recording inside jax.jit?): record "
                "outside jit, or call the jitted function and record its returned routing"
            ) from error
        raise


def _int_array(values: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(values, np.ndarray) or not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name} must be an integer NumPy array")
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {values.shape}")
    return values.astype(np.int32, copy=False)


def _float_array(values: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(values, np.ndarray) or values.dtype != np.float32:
        raise TypeError(f"{name} must be a float32 NumPy array")
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {values.shape}")
    return values


@dataclass(frozen=True, eq=False)
class TraceRecord:
    """One routing decision (a layer at a step), on the host.

    Attributes
    ----------
    layer, step : int
        Where the call sits in the model and in time.
    name : str
        The block's name (a transformers module path), or "".
    token_ids, expert_ids, weights, choice_ids : ndarray (R,)
        As in :class:`moerouter.Routing` (int32, int32, float32, int32).
    finite_rows : ndarray (T,) bool
        As in :class:`moerouter.Routing`.
    sequence, position : ndarray (T,) int32
        Each token's sequence (batch row) and position in it.
    num_tokens, num_experts, num_choices : int
        ``T``, ``E`` and ``E'`` (real plus null columns).
    layout : {"token", "expert"}
    slots, num_groups : int
    capacity : int or None
        As in :class:`moerouter.Routing`.
    probs : ndarray (T, E') float32 or None
        Router probabilities, when recorded.
    logits : ndarray (T, E') float32 or None
        The logits the policy was given, when recorded (needed by :meth:`route`).
    """

    layer: int
    step: int
    name: str
    token_ids: np.ndarray
    expert_ids: np.ndarray
    weights: np.ndarray
    choice_ids: np.ndarray
    finite_rows: np.ndarray
    sequence: np.ndarray
    position: np.ndarray
    num_tokens: int
    num_experts: int
    num_choices: int
    layout: Literal["token", "expert"]
    slots: int
    num_groups: int = 1
    capacity: int | None = None
    probs: np.ndarray | None = field(default=None, repr=False)
    logits: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("layer", "step", "num_tokens", "num_experts", "num_choices", "slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.layout not in ("token", "expert"):
            raise ValueError(f"layout must be 'token' or 'expert', got {self.layout!r}")
        tokens, rows = self.num_tokens, int(np.shape(self.expert_ids)[0])
        if self.layout == "token" and rows != tokens * self.slots:
            raise ValueError(f"a token-layout record needs T * k = {tokens * self.slots} rows")
        set_ = object.__setattr__  # normalise dtypes once, on a frozen dataclass
        for name in ("token_ids", "expert_ids", "choice_ids"):
            set_(self, name, _int_array(getattr(self, name), name, (rows,)))
        set_(self, "weights", _float_array(self.weights, "weights", (rows,)))
        for name in ("sequence", "position"):
            set_(self, name, _int_array(getattr(self, name), name, (tokens,)))
        if not isinstance(self.finite_rows, np.ndarray) or self.finite_rows.dtype != np.bool_:
            raise TypeError("finite_rows must be a bool NumPy array")
        if self.finite_rows.shape != (tokens,):
            raise ValueError(f"finite_rows must have shape ({tokens},)")
        for name in ("probs", "logits"):
            value = getattr(self, name)
            if value is not None:
                _float_array(value, name, (tokens, self.num_choices))

    @classmethod
    def from_routing(
        cls,
        routing: Routing,
        *,
        layer: int = 0,
        step: int = 0,
        name: str = "",
        logits: Array = None,
        probs: bool = False,
        sequence: Array = None,
        position: Array = None,
    ) -> TraceRecord:
        """Copy a routing (any backend) to the host.

        Parameters
        ----------
        routing : Routing
            Any policy's output (concrete values: not inside ``jax.jit``).
        layer, step : int
            Where the call sits.
        name : str
            A label, such as the module path.
        logits : array (T, E') or (G, S, E'), optional
            The policy's input, kept for :meth:`route` (as float32).
        probs : bool
            Keep ``routing.probs``.
        sequence, position : array (T,) int, optional
            Token metadata; by default each of the routing's ``G`` groups is a sequence.
        """
        routing = check_routing(routing)
        tokens = routing.num_tokens
        per_group = tokens // max(routing.num_groups, 1) if tokens else 1
        index = np.arange(tokens, dtype=np.int32)
        kept_logits = None
        if logits is not None:
            kept_logits = to_numpy(logits).astype(np.float32).reshape(tokens, routing.num_choices)
        return cls(
            layer=int(layer),
            step=int(step),
            name=str(name),
            token_ids=to_numpy(routing.token_ids),
            expert_ids=to_numpy(routing.expert_ids),
            weights=to_numpy(routing.weights),
            choice_ids=to_numpy(routing.choice_ids),
            finite_rows=to_numpy(routing.finite_rows),
            sequence=index // per_group if sequence is None else to_numpy(sequence),
            position=index % per_group if position is None else to_numpy(position),
            num_tokens=tokens,
            num_experts=routing.num_experts,
            num_choices=routing.num_choices,
            layout=routing.layout,
            slots=routing.slots,
            num_groups=routing.num_groups,
            capacity=routing.capacity,
            probs=to_numpy(routing.probs) if probs else None,
            logits=kept_logits,
        )

    def routing(self, *, xp: Any = None, like: Array = None, device: Any = None) -> Routing:
        """The recorded decision as a :class:`moerouter.Routing` on a backend (NumPy by default).

        Every array equals the recorded one bit for bit. Without recorded ``probs`` the
        routing's ``probs`` are zeros (load figures do not read them; the entropy in
        :func:`moerouter.stats.summary` is then 0).
        """
        xp, device = _namespace(xp, like, device)
        probs = self.probs
        if probs is None:
            probs = np.zeros((self.num_tokens, self.num_choices), dtype=np.float32)
        return Routing(
            token_ids=_to_backend(self.token_ids, xp, device),
            expert_ids=_to_backend(self.expert_ids, xp, device),
            weights=_to_backend(self.weights, xp, device),
            choice_ids=_to_backend(self.choice_ids, xp, device),
            probs=_to_backend(probs, xp, device),
            finite_rows=_to_backend(self.finite_rows, xp, device),
            num_tokens=self.num_tokens,
            num_experts=self.num_experts,
            layout=self.layout,
            slots=self.slots,
            num_groups=self.num_groups,
            capacity=self.capacity,
        )

    def route(
        self,
        policy: Any,
        *args: Any,
        xp: Any = None,
        like: Array = None,
        device: Any = None,
        **kwargs: Any,
    ) -> Routing:
        """Route the recorded logits with ``policy`` (on a backend; NumPy by default).

        The logits keep the recorded grouping: ``(G, S, E')`` when the call had ``G > 1``
        groups. Extra arguments go to the policy (``token_nodes`` of
        :class:`moerouter.LocalityTopK`, a correction bias, ...).
        """
        if self.logits is None:
            raise ValueError(
                f"record (layer {self.layer}, step {self.step}) holds no logits: record with "
                "traces.record(logits=True) to replay through another policy"
            )
        xp, device = _namespace(xp, like, device)
        logits = self.logits
        if self.num_tokens % max(self.num_groups, 1):
            raise ValueError(
                f"record (layer {self.layer}, step {self.step}) has {self.num_tokens} tokens in "
                f"{self.num_groups} groups of different sizes: route its parts one by one"
            )
        if self.num_groups > 1:
            logits = logits.reshape(self.num_groups, -1, self.num_choices)
        return policy(_to_backend(logits, xp, device), *args, **kwargs)  # type: ignore[no-any-return]


def _namespace(xp: Any, like: Array, device: Any) -> tuple[Any, Any]:
    if like is not None:
        if xp is not None:
            raise TypeError("give either xp= or like=, not both")
        if not is_array_api_obj(like):
            raise TypeError(f"like must be an array, got {type(like).__name__}")
        return array_namespace(like), device_of(like) if device is None else device
    return (np if xp is None else xp), device


def _to_backend(values: np.ndarray, xp: Any, device: Any) -> Array:
    if xp is np:
        if device not in (None, "cpu"):
            raise ValueError(f"device={device!r} needs xp= or like= (NumPy arrays live on the cpu)")
        return values.copy()
    return xp.asarray(values, device=device)


@dataclass
class Trace:
    """Routing records with free-form metadata; :meth:`save` and :func:`load` keep both.

    Attributes
    ----------
    records : list of TraceRecord
        In the order they were recorded.
    metadata : dict
        JSON-serialisable facts about the run (model name, batch, ...).
    version : int
        The file format version it was read from (:data:`TRACE_VERSION` when built here).
    """

    records: list[TraceRecord] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = TRACE_VERSION

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[TraceRecord]:
        return iter(self.records)

    @property
    def layers(self) -> list[int]:
        """The distinct layers, in increasing order."""
        return sorted({record.layer for record in self.records})

    @property
    def steps(self) -> list[int]:
        """The distinct steps, in increasing order."""
        return sorted({record.step for record in self.records})

    def save(self, path: str | os.PathLike[str], *, compress: bool = False) -> None:
        """Write the trace to ``path`` (``.npz``; see the module docstring for the layout)."""
        save(self, path, compress=compress)


_STATIC = ("layer", "step", "name", "num_tokens", "num_experts", "num_choices", "layout", "slots")


def save(trace: Trace, path: str | os.PathLike[str], *, compress: bool = False) -> None:
    """Write ``trace`` to ``path`` as ``.npz`` (``compress=True``: zip-deflated, slower)."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a moerouter.traces.Trace, got {type(trace).__name__}")
    arrays: dict[str, Any] = {}  # Any: np.savez's **kwds would also match its allow_pickle
    headers = []
    for index, rec in enumerate(trace.records):
        narrow = rec.num_choices < np.iinfo(np.int16).max
        ids = np.int16 if narrow else np.int32
        header: dict[str, Any] = {key: getattr(rec, key) for key in _STATIC}
        header.update(
            num_groups=rec.num_groups,
            capacity=rec.capacity,
            probs=rec.probs is not None,
            logits=rec.logits is not None,
        )
        headers.append(header)
        arrays[f"{index}.expert_ids"] = rec.expert_ids.astype(ids)
        arrays[f"{index}.choice_ids"] = rec.choice_ids.astype(ids)
        arrays[f"{index}.weights"] = rec.weights
        arrays[f"{index}.finite_rows"] = rec.finite_rows
        arrays[f"{index}.sequence"] = rec.sequence
        arrays[f"{index}.position"] = rec.position
        if rec.layout == "expert":
            arrays[f"{index}.token_ids"] = rec.token_ids
        for optional in ("probs", "logits"):
            value = getattr(rec, optional)
            if value is not None:
                arrays[f"{index}.{optional}"] = value
    document = {"version": TRACE_VERSION, "metadata": trace.metadata, "records": headers}
    try:
        text = json.dumps(document)
    except TypeError as error:
        raise TypeError(f"trace.metadata must be JSON-serialisable: {error}") from None
    writer = np.savez_compressed if compress else np.savez
    with open(path, "wb") as handle:
        writer(handle, header=np.asarray(text), **arrays)


def load(path: str | os.PathLike[str]) -> Trace:
    """Read a trace written by :func:`save` (no pickle is ever loaded).

    Raises
    ------
    ValueError
        When the file is not a moerouter trace, or was written by a newer format version.
    """
    with np.load(path, allow_pickle=False) as archive:
        if "header" not in archive.files:
            raise ValueError(f"{os.fspath(path)!r} is not a moerouter trace (no header)")
        document = json.loads(str(archive["header"][()]))
        version = document.get("version")
        if not isinstance(version, int) or not 1 <= version <= TRACE_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} has trace format version {version!r}; this moerouter "
                f"reads versions 1 to {TRACE_VERSION}"
            )
        records = []
        for index, header in enumerate(document["records"]):

            def array(key: str, i: int = index) -> np.ndarray:
                return np.asarray(archive[f"{i}.{key}"])

            tokens, slots = int(header["num_tokens"]), int(header["slots"])
            if header["layout"] == "token":
                token_ids = np.repeat(np.arange(tokens, dtype=np.int32), slots)
            else:
                token_ids = array("token_ids")
            records.append(
                TraceRecord(
                    layer=int(header["layer"]),
                    step=int(header["step"]),
                    name=str(header["name"]),
                    token_ids=token_ids,
                    expert_ids=array("expert_ids").astype(np.int32),
                    weights=array("weights"),
                    choice_ids=array("choice_ids").astype(np.int32),
                    finite_rows=array("finite_rows"),
                    sequence=array("sequence"),
                    position=array("position"),
                    num_tokens=tokens,
                    num_experts=int(header["num_experts"]),
                    num_choices=int(header["num_choices"]),
                    layout=header["layout"],
                    slots=slots,
                    num_groups=int(header["num_groups"]),
                    capacity=header["capacity"],
                    probs=array("probs") if header["probs"] else None,
                    logits=array("logits") if header["logits"] else None,
                )
            )
    return Trace(records=records, metadata=dict(document.get("metadata", {})), version=version)


def concatenate(records: Iterable[TraceRecord]) -> TraceRecord:
    """One record of the tokens of several, laid end to end (each rank's record of one call).

    Expert-parallel ranks each route their own tokens; concatenating their records of the same
    layer and step, in rank order, gives the global call that :func:`moerouter.simulate.run`
    reads (with ``token_ranks`` saying which tokens came from which rank). Token ids move by
    the tokens before them, sequences by the sequences before them, and the groups add up.

    Parameters
    ----------
    records : iterable of TraceRecord
        Same layer, step, layout, ``E``, ``E'`` and ``slots``; ``probs`` and ``logits`` are kept
        when every record has them.

    Returns
    -------
    TraceRecord
        Named, placed and timed as the first record; ``capacity`` kept when all agree.
    """
    parts = list(records)
    if not parts or not all(isinstance(part, TraceRecord) for part in parts):
        raise TypeError("records must be a non-empty iterable of TraceRecords")
    first = parts[0]
    for key in ("layer", "step", "layout", "num_experts", "num_choices", "slots"):
        values = {getattr(part, key) for part in parts}
        if len(values) > 1:
            raise ValueError(f"records to concatenate must share {key}, got {sorted(values)}")
    token_offsets = np.cumsum([0] + [part.num_tokens for part in parts])
    sequence_offsets = np.cumsum(
        [0] + [int(part.sequence.max()) + 1 if part.num_tokens else 0 for part in parts]
    )

    def joined(key: str) -> np.ndarray | None:
        values = [getattr(part, key) for part in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    capacities = {part.capacity for part in parts}
    return TraceRecord(
        layer=first.layer,
        step=first.step,
        name=first.name,
        token_ids=np.concatenate(
            [part.token_ids + offset for part, offset in zip(parts, token_offsets, strict=False)]
        ),
        expert_ids=np.concatenate([part.expert_ids for part in parts]),
        weights=np.concatenate([part.weights for part in parts]),
        choice_ids=np.concatenate([part.choice_ids for part in parts]),
        finite_rows=np.concatenate([part.finite_rows for part in parts]),
        sequence=np.concatenate(
            [part.sequence + offset for part, offset in zip(parts, sequence_offsets, strict=False)]
        ),
        position=np.concatenate([part.position for part in parts]),
        num_tokens=int(token_offsets[-1]),
        num_experts=first.num_experts,
        num_choices=first.num_choices,
        layout=first.layout,
        slots=first.slots,
        num_groups=sum(part.num_groups for part in parts),
        capacity=capacities.pop() if len(capacities) == 1 else None,
        probs=joined("probs"),
        logits=joined("logits"),
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
