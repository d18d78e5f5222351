""":class:`Trace` (a list of records with metadata), its ``.npz`` file format (:func:`save`,
:func:`load`) and :func:`concatenate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moerouter.traces._record import TRACE_VERSION, TraceRecord

__all__ = ["Trace", "concatenate", "load", "save"]


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
