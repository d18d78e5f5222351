"""Docstring entries that many public names share, written once and filled in at import time.

A docstring names a shared entry with a line ``%(name)s`` of its own, and :func:`fill_doc`,
applied as a decorator, replaces that line with the entry, indented like the placeholder. The
text is complete in ``__doc__`` before anyone reads it, so ``help()``, Sphinx autodoc with
numpydoc, and doctest all see the full docstring (the mechanism of SciPy's ``_lib.doccer`` and
Matplotlib's ``_docstring.interpd``). A name that is not in :data:`ENTRIES` raises at import,
so a typo cannot reach the rendered docs.
"""

from __future__ import annotations

import re
import textwrap
from typing import TypeVar

__all__ = ["ENTRIES", "fill_doc"]

_Documented = TypeVar("_Documented")

ENTRIES: dict[str, str] = {
    # Parameters.
    "xp": """
        xp : namespace, optional
            Array namespace; inferred from the arrays when None.
        """,
    "mask": """
        mask : array (T,) or (G, S) bool, optional
            Valid (non-padding) tokens.
        """,
    "routing": """
        routing : Routing
            Any policy's output.
        """,
    "strict": """
        strict : bool
            Raise on non-finite logits rows (concrete values only).
        """,
    "num_experts_logits": """
        num_experts : int
            ``E``; the logits' last dimension.
        """,
    "capacity_multiple_of_capped": """
        capacity_multiple_of : int
            Round ``C`` up to a multiple of this before capping at ``S``.
        """,
    "labels": """
        labels : array (N,)
            Integer classes in ``[0, K)``; one outside it makes the loss NaN.
        """,
    # Returns.
    "masked_scalar": """
        array ()
            float32 scalar.
            0 when no token is valid (zero tokens: see the module docstring).
        """,
}

_PLACEHOLDER = re.compile(r"^([ \t]*)%\((\w+)\)s[ \t]*$", re.MULTILINE)


def _entry(match: re.Match[str]) -> str:
    indent, name = match.groups()
    if name not in ENTRIES:
        raise KeyError(f"no shared docstring entry {name!r} (moerouter._docs.ENTRIES)")
    return textwrap.indent(textwrap.dedent(ENTRIES[name]).strip("\n"), indent)


def fill_doc(documented: _Documented) -> _Documented:
    """Replace each ``%(name)s`` line of ``documented.__doc__`` with the shared entry ``name``.

    Returns ``documented`` itself; under ``python -OO`` (no docstrings) it does nothing.
    """
    doc = getattr(documented, "__doc__", None)
    if doc:
        documented.__doc__ = _PLACEHOLDER.sub(_entry, doc)
    return documented
