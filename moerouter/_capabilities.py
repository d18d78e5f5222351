"""What each policy supports, declared once, on the class it describes.

As SciPy's ``xp_capabilities`` decorator sits on each function, a :class:`PolicyCapabilities`
decorates each policy class (``@PolicyCapabilities(scores=..., capacity=...)``), so a change to
a policy and to what it claims land in the same place. The docs' support table is rendered from
these declarations (``docs/_ext/moerouter_tables.py``) and ``tests/contract/test_capabilities.py``
checks each claim against the policy's behaviour, so the table cannot drift from the code. What
the signature already says (per-call overrides, extra inputs) is read from the signature, not
declared again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

__all__ = ["CAPACITY_KINDS", "SCORES", "PolicyCapabilities", "capabilities_of"]

#: Score functions a policy may turn logits into.
SCORES = frozenset({"softmax", "sigmoid", "relu"})

#: ``"optional"``: ``capacity_factor=None`` turns it off; ``"always"``: a ``capacity_factor`` is
#: always applied; ``"exact"``: every expert gets exactly its share, with no capacity knob;
#: ``"none"``: no capacity.
CAPACITY_KINDS = ("optional", "always", "exact", "none")

_ATTRIBUTE = "_moerouter_capabilities"

_Policy = TypeVar("_Policy", bound=type)


@dataclass(frozen=True)
class PolicyCapabilities:
    """One policy's declared support; decorates the policy class, is rendered into the docs and
    checked by the tests.

    Parameters
    ----------
    scores : tuple of str
        Score functions the policy offers (``"softmax"``, ``"sigmoid"``, ``"relu"``); empty for
        a policy that scores nothing (hash routing) or takes them from a wrapped policy.
    capacity : {"optional", "always", "exact", "none"}
        See :data:`CAPACITY_KINDS`.
    grouped : bool
        Accepts grouped logits ``(G, S, E')`` and routes every group on its own.
    expert_groups : bool
        Can restrict a token to a few groups of experts (DeepSeek's group-limited routing, nodes).
    causal : bool
        With capacity off, a token's experts never depend on later tokens, so the policy suits an
        autoregressive decoder.
    jax_jit : bool
        Runs under ``jax.jit`` with the eager result.
    torch_compile : bool
        Runs under ``torch.compile(fullgraph=True)`` with the eager result.
    wraps_policy : bool
        Wraps another policy, whose scores and capacity apply; ``scores`` and ``capacity`` then
        describe the wrapper itself (none).
    """

    scores: tuple[str, ...]
    capacity: Literal["optional", "always", "exact", "none"]
    grouped: bool = True
    expert_groups: bool = False
    causal: bool = False
    jax_jit: bool = True
    torch_compile: bool = True
    wraps_policy: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.scores) - SCORES
        if unknown:
            raise ValueError(
                f"scores has unknown entries {sorted(unknown)}; known: {sorted(SCORES)}"
            )
        if self.capacity not in CAPACITY_KINDS:
            raise ValueError(f"capacity must be one of {CAPACITY_KINDS}, got {self.capacity!r}")
        if self.wraps_policy and (self.scores or self.capacity != "none"):
            raise ValueError("a policy wrapper takes scores and capacity from the wrapped policy")

    def __call__(self, cls: _Policy) -> _Policy:
        """Attach this declaration to the policy class ``cls`` (used as a class decorator)."""
        setattr(cls, _ATTRIBUTE, self)
        return cls


def capabilities_of(policy: object) -> PolicyCapabilities | None:
    """The declaration of a policy class or instance, or None when it declares none."""
    cls = policy if isinstance(policy, type) else type(policy)
    declared = cls.__dict__.get(_ATTRIBUTE)
    return declared if isinstance(declared, PolicyCapabilities) else None
