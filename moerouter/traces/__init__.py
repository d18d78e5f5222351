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

The package splits into one record (``_record``: :class:`TraceRecord`, :func:`to_numpy`), a
trace and its file (``_trace``: :class:`Trace`, :func:`save`, :func:`load`, :func:`concatenate`)
and recording (``_recording``: :func:`record`, :func:`traced`, :func:`replay`,
:func:`record_transformers`); every name is imported from here, ``moerouter.traces``.
"""

from __future__ import annotations

from moerouter.traces._record import TRACE_VERSION, TraceRecord, to_numpy
from moerouter.traces._recording import (
    Recorder,
    TracedPolicy,
    record,
    record_transformers,
    replay,
    traced,
)
from moerouter.traces._trace import Trace, concatenate, load, save

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
