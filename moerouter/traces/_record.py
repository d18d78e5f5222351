"""One routing call held on the host: :class:`TraceRecord`, its checks, and its way back to a
:class:`moerouter.Routing` on any backend (:func:`to_numpy` makes the host copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj
from array_api_compat import device as device_of

from moerouter._arrays import host_copy
from moerouter._typing import Array
from moerouter._validation import check_routing
from moerouter.routing import Routing

__all__ = ["TRACE_VERSION", "TraceRecord", "to_numpy"]

#: Version of the ``.npz`` layout written by :func:`save`; :func:`load` reads this and older.
TRACE_VERSION = 1


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
