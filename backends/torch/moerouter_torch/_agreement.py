"""The check every rank of an expert-parallel group makes before rows move: do all ranks agree?

Before each exchange of :mod:`moerouter_torch.distributed`, every rank gathers a small
fixed-size header from every other rank: which exchange it is at, whether it failed before the
exchange, and its settings (``num_experts``, hidden size, ``capacity``, dtype, gradient mode).
:func:`_agree` then raises the same error on every rank when something is off, where the
all-to-all itself would abort the process (Gloo) or hang. Kept apart from the exchanges: it is a
protocol of its own (a header layout, its encoding of names, the errors it raises) that the
transports only call.
"""

from __future__ import annotations

import zlib
from typing import Any, get_args

import torch
import torch.distributed as dist

from moerouter_torch.nn import Activation

__all__ = ["PeerRankError"]


class PeerRankError(RuntimeError):
    """Another rank of the expert-parallel group failed before an exchange this rank is in.

    Raised on every rank that was itself fine, in place of waiting for the failed rank until the
    process-group timeout; the failed rank raises its own error. The message names the failed
    ranks and their errors. Every rank raises at the same exchange, so the group stays usable.
    """

    # Public as moerouter_torch.distributed.PeerRankError: shown, and pickled, under that name.
    __module__ = "moerouter_torch.distributed"


# The header every rank sends before an exchange (int64): which exchange it is at, whether the
# rank failed, the length of its error message, its settings, the message's UTF-8 bytes. Its size
# never depends on the settings, so ranks that disagree still exchange it safely.
_BUILD, _DISPATCH = 1, 2
_PHASES = {_BUILD: "building an ExpertParallelMoE", _DISPATCH: "in dispatch"}
_MAX_SETTINGS = 8
_MESSAGE_BYTES = 256
_SETTINGS_AT = 3
_MESSAGE_AT = _SETTINGS_AT + _MAX_SETTINGS
_HEADER_SIZE = _MESSAGE_AT + _MESSAGE_BYTES // 8
_NONE = -1  # how ``capacity=None`` travels; every other setting is >= 0


def _code(name: str) -> int:
    """A name (dtype, activation) as an int that is the same in every process (no hash salt)."""
    return zlib.crc32(name.encode())


# Settings that travel as _code(name) or as 0/1, to be shown back as names and booleans.
_NAMED_SETTINGS = ("dtype", "activation")
_FLAG_SETTINGS = ("torch.is_grad_enabled()", "x.requires_grad")


def _shown(setting: str, value: int) -> str:
    if value == _NONE:
        return "None"
    if setting in _FLAG_SETTINGS:
        return str(bool(value))
    if setting in _NAMED_SETTINGS:
        dtypes = (str(dtype) for dtype in vars(torch).values() if isinstance(dtype, torch.dtype))
        names = (*dtypes, *get_args(Activation))
        return next((name for name in names if _code(name) == value), f"#{value}")
    return str(value)


def _header_device(group: Any, preferred: torch.device | None) -> torch.device:
    """Where the header goes: the device the group's backend moves, whatever state ``x`` is in."""
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if preferred is not None:
        return preferred
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(
    group: Any,
    device: torch.device,
    phase: int,
    settings: dict[str, int],
    failure: Exception | None,
) -> None:
    """Gather every rank's header and raise the same error on every rank when something is off.

    ``failure`` is an error this rank hit before the exchange: it is re-raised here after the
    peers have been told, and they raise :class:`PeerRankError`. Otherwise, settings that differ
    across ranks raise a ``ValueError`` naming them. Either way every rank stops at this same
    collective, so none is left waiting in the all-to-all that follows.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # Replaying a CUDA graph runs no Python, so nothing can fail between exchanges, and a
        # host read here would break the capture; every rank captures the same graph.
        if failure is not None:
            raise failure
        return
    header = torch.zeros(_HEADER_SIZE, dtype=torch.int64)
    header[0] = phase
    if failure is not None:
        message = f"{type(failure).__name__}: {failure}".encode()[:_MESSAGE_BYTES]
        header[1] = 1
        header[2] = len(message)
        padded = bytearray(message.ljust(_MESSAGE_BYTES, b"\0"))
        header[_MESSAGE_AT:] = torch.frombuffer(padded, dtype=torch.int64)
    elif settings:
        values = torch.tensor(list(settings.values()), dtype=torch.int64)
        header[_SETTINGS_AT : _SETTINGS_AT + len(settings)] = values
    header = header.to(device)
    gathered = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, header, group=group)
    table = torch.stack(gathered).cpu()

    if failure is not None:
        raise failure
    failed = [rank for rank in range(table.shape[0]) if table[rank, 1]]
    if failed:
        details = "; ".join(
            f"rank {rank}: "
            + bytes(table[rank, _MESSAGE_AT:].numpy().tobytes()[: int(table[rank, 2])]).decode(
                errors="replace"
            )
            for rank in failed
        )
        raise PeerRankError(
            f"rank {', '.join(map(str, failed))} of the expert-parallel group raised before the "
            f"exchange, so this rank stops too rather than wait for it ({details})"
        )
    phases = table[:, 0].tolist()
    if len(set(phases)) > 1:
        where = ", ".join(f"rank {rank} {_PHASES[p]}" for rank, p in enumerate(phases))
        raise RuntimeError(
            f"the ranks of the expert-parallel group are at different exchanges ({where}): every "
            "rank must build the same layers and run them in the same order"
        )
    disagreements = []
    for index, name in enumerate(settings):
        values = table[:, _SETTINGS_AT + index].tolist()
        if len(set(values)) > 1:
            per_rank = ", ".join(f"{_shown(name, v)} on rank {r}" for r, v in enumerate(values))
            disagreements.append(f"{name} is {per_rank}")
    if disagreements:
        raise ValueError(
            "expert parallelism needs the same settings on every rank of the group, but "
            + "; ".join(disagreements)
        )
