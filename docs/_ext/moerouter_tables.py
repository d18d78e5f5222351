"""Support tables rendered from the code, so that they cannot drift from it.

``.. moerouter-kernel-table::``
    One row per backend plugin moerouter knows (:func:`moerouter._registry.known_plugins`), one
    column per kernel slot (``KERNEL_NAMES``) ticked from the plugin's ``BackendInfo.kernels``,
    plus any other field a ``BackendInfo`` declares. Importing a plugin needs its library, not a
    device: the table is the same on a CPU-only build machine.

``.. moerouter-policy-table::``
    One row per policy class of :mod:`moerouter.policies` that declares its capabilities
    (``moerouter._capabilities``); the per-call overrides and extra inputs are read from the
    signature of its ``__call__``. The directive's content lists classes in display order; every
    other declared policy follows in name order, so a new policy needs no line here. A listed name
    that declares nothing is a build warning (an error under ``-W``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from collections.abc import Mapping
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import moerouter.policies
from moerouter import _registry
from moerouter._capabilities import PolicyCapabilities, capabilities_of

logger = logging.getLogger(__name__)

YES, NO = "✓", "—"
# Pipeline order for the kernel slots moerouter knows today; any slot added later follows.
_PIPELINE = ("make_plan", "dispatch", "combine")
# BackendInfo fields shown in their own columns; any other field gets a column of its own.
_SHOWN = {"name", "array_library", "kernels", "description"}


def _cell(value: Any) -> str:
    """A BackendInfo field as a table cell: sets and sequences listed, booleans ticked."""
    if isinstance(value, bool):
        return YES if value else NO
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {_cell(item)}" for key, item in sorted(value.items())) or NO
    if isinstance(value, set | frozenset | list | tuple):
        return ", ".join(sorted(str(item) for item in value)) or NO
    return "" if value is None else str(value)


def _list_table(header: list[str], rows: list[list[str]], widths: list[int]) -> list[str]:
    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        f"   :widths: {' '.join(map(str, widths))}",
        "",
    ]
    for row in [header, *rows]:
        for index, cell in enumerate(row):
            lines.append(f"   {'* -' if index == 0 else '  -'} {cell or ' '}")
    return lines


class _TableDirective(SphinxDirective):
    has_content = True

    def render(self, lines: list[str]) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), 0, container)
        return list(container.children)


def kernel_slots() -> list[str]:
    slots = set(_registry.KERNEL_NAMES)
    return [name for name in _PIPELINE if name in slots] + sorted(slots - set(_PIPELINE))


def _plugin(target: str) -> Any:
    """The plugin's BackendInfo, or a sentence saying why there is none."""
    module = target.partition(":")[0]
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        return "not installed"
    try:
        return _registry._import_plugin(target)  # what ``python -m moerouter info`` reads
    except Exception as error:
        return f"fails to load ({type(error).__name__}: {error})"


def kernel_table() -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, problems) of the kernel table; a problem is a plugin that did not load."""
    slots = kernel_slots()
    extra = [f.name for f in dataclasses.fields(_registry.BackendInfo) if f.name not in _SHOWN]
    header = [
        "arrays",
        "plugin",
        *[f"``{slot}``" for slot in slots],
        *[name.replace("_", " ") for name in extra],
        "description",
    ]
    rows = [
        [
            "any array-API library",
            "none: the agnostic path, the reference for every kernel",
            *[YES for _ in slots],
            *["" for _ in extra],
            "always available; the only path for array-api-strict",
        ]
    ]
    problems = []
    for library, target in _registry.known_plugins().items():
        info = _plugin(target)
        if not isinstance(info, _registry.BackendInfo):
            problems.append(f"plugin {target} {info}")
            cells = ["?" for _ in slots] + ["" for _ in extra]
            rows.append([f"``{library}``", f"``{target}``", *cells, info])
            continue
        rows.append(
            [
                f"``{info.array_library}``",
                f"``{target.partition(':')[0]}``",
                *[YES if slot in info.kernels else NO for slot in slots],
                *[_cell(getattr(info, name)) for name in extra],
                info.description,
            ]
        )
    return header, rows, problems


class KernelTable(_TableDirective):
    """``.. moerouter-kernel-table::`` (no content)."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        header, rows, problems = kernel_table()
        for problem in problems:
            logger.warning(
                "moerouter-kernel-table: %s; install every plugin to build the docs "
                "(nox -s docs does)",
                problem,
                location=self.get_location(),
            )
        slots = len(kernel_slots())
        widths = [14, 22, *[9] * slots, *[12] * (len(header) - slots - 3), 40]
        return self.render(_list_table(header, rows, widths))


def _call_parameters(cls: type) -> tuple[list[str], list[str]]:
    """(inputs after the first, keyword-only overrides) of ``cls.__call__``."""
    parameters = list(inspect.signature(cls.__call__).parameters.values())[2:]  # self, logits
    inputs = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    overrides = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
    return inputs, overrides


def declared_policies() -> dict[str, tuple[type, PolicyCapabilities]]:
    """The policy classes of ``moerouter.policies.__all__`` that declare their capabilities."""
    found = {}
    for name in moerouter.policies.__all__:
        obj = getattr(moerouter.policies, name)
        declared = capabilities_of(obj) if isinstance(obj, type) else None
        if declared is not None:
            found[name] = (obj, declared)
    return found


def display_order(names: Mapping[str, Any], order: list[str]) -> list[str]:
    """``names`` in display order: those of ``order`` first, then the others sorted."""
    return [name for name in order if name in names] + sorted(set(names) - set(order))


def _code(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(f"``{name}``" for name in names) or NO


class PolicyTable(_TableDirective):
    """``.. moerouter-policy-table::`` with one policy class name per content line."""

    def run(self) -> list[nodes.Node]:
        declared = declared_policies()
        order = [line.strip() for line in self.content if line.strip()]
        for name in order:
            if name not in declared:
                logger.warning(
                    "moerouter-policy-table: %s declares no capabilities (or is not a policy)",
                    name,
                    location=self.get_location(),
                )
        # Two tables, so that each fits the page: what the policy computes with, where it runs.
        computes = [["policy", "scores", "capacity", "per-call overrides", "extra inputs"]]
        runs = [
            [
                "policy",
                "``(G, S, E')`` groups",
                "expert groups",
                "causal",
                "``jax.jit``",
                "``torch.compile``",
            ]
        ]
        for name in display_order(declared, order):
            cls, caps = declared[name]
            inputs, overrides = _call_parameters(cls)
            inherited = "the wrapped policy's"
            link = f":class:`~moerouter.{name}`"
            computes.append(
                [
                    link,
                    inherited if caps.wraps_policy else _code(caps.scores),
                    inherited if caps.wraps_policy else caps.capacity,
                    _code(overrides),
                    _code(inputs),
                ]
            )
            flags = (
                caps.grouped,
                caps.expert_groups,
                caps.causal,
                caps.jax_jit,
                caps.torch_compile,
            )
            runs.append([link, *[YES if flag else NO for flag in flags]])
        lines = _list_table(computes[0], computes[1:], [30, 16, 10, 22, 22])
        lines += ["", *_list_table(runs[0], runs[1:], [30, 14, 14, 14, 14, 14])]
        return self.render(lines)


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("moerouter-kernel-table", KernelTable)
    app.add_directive("moerouter-policy-table", PolicyTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
