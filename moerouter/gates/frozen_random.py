"""SMoE-Dropout's frozen random router (Chen et al., ICLR 2023): logits from a linear map never
trained; its k schedule is :mod:`moerouter.methods.smoe_dropout`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from array_api_compat import array_namespace, device, is_array_api_obj

from moerouter._typing import Array
from moerouter._validation import check_fields, check_positive_int

__all__ = ["FrozenRandomRouter"]


@dataclass(frozen=True, eq=False)
class FrozenRandomRouter:
    r"""SMoE-Dropout's router: a randomly initialised linear map that is never trained.

    ``logits = x W + b`` with :math:`W \in \mathbb{R}^{d \times E}` and :math:`b \in
    \mathbb{R}^E` drawn once from :math:`U(-1/\sqrt d, 1/\sqrt d)` — PyTorch's default
    ``nn.Linear`` initialisation, which the official code (``VITA-Group/Random-MoE-as-Dropout``,
    ``custom_gate.py::CustomNaiveGate`` with ``--freeze_gate``) uses and freezes — from
    ``numpy.random.default_rng(seed)``, so the router is the same on every backend. The weights
    enter each call as constants: no gradient reaches them. Route its logits with
    ``mr.TopK(E, k)`` (top-k of the raw logits, softmax over the k selected: the official
    gate), and grow ``k`` with :func:`k_schedule`.

    Parameters
    ----------
    d_model : int
        Input features ``d``.
    num_experts : int
        ``E``.
    seed : int
        Seeds the draw; the same seed gives the same router.
    bias : bool
        Add the bias ``b`` (the official gate has one).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> import moerouter as mr
    >>> router = mr.FrozenRandomRouter(d_model=3, num_experts=4, seed=0)
    >>> router(xp.ones((2, 3))).shape
    (2, 4)
    """

    d_model: int
    num_experts: int
    seed: int
    bias: bool = True
    weight_matrix: npt.NDArray[np.float32] = field(init=False, repr=False)
    bias_vector: npt.NDArray[np.float32] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int(self.d_model, "d_model")
        check_positive_int(self.num_experts, "num_experts")
        rng = np.random.default_rng(self.seed)
        bound = 1.0 / math.sqrt(self.d_model)
        weight = rng.uniform(-bound, bound, (self.d_model, self.num_experts)).astype(np.float32)
        weight.setflags(write=False)
        bias = None
        if self.bias:
            bias = rng.uniform(-bound, bound, self.num_experts).astype(np.float32)
            bias.setflags(write=False)
        object.__setattr__(self, "weight_matrix", weight)
        object.__setattr__(self, "bias_vector", bias)

    def __call__(self, x: Array) -> Array:
        """Logits (..., E) float32 of ``x`` (..., d) on ``x``'s backend and device."""
        if not is_array_api_obj(x):
            raise TypeError(f"x must be an array, got {type(x).__name__}")
        xp = array_namespace(x)
        if x.ndim < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have d_model = {self.d_model} features in its last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"x must be a real floating dtype, got {x.dtype}")
        where = device(x)
        # Copies: the stored arrays are read-only, which torch warns about when sharing them.
        weight = xp.asarray(self.weight_matrix, device=where, copy=True)
        logits = xp.matmul(xp.astype(x, xp.float32), weight)
        if self.bias_vector is not None:
            logits = logits + xp.asarray(self.bias_vector, device=where, copy=True)
        return logits
