"""The policy pages' index and the API list of policies, built from the pages and the code.

A new policy then needs its own page and its export, not a line in each index.

``.. moerouter-policy-row:: Name`` (on a policy's page)
    Its row of the comparison table on the policies index: ``:chooses:`` (who chooses),
    ``:experts:`` (experts per token), ``:use:`` (use it for), and ``:with:`` for what the first
    cell adds after the link (``+ TopK``). ``Name`` must be a public name of
    :mod:`moerouter.policies`. Renders nothing on the page itself.

``.. moerouter-policy-pages::`` (on the policies index)
    The comparison table, one row per ``moerouter-policy-row`` of the pages, linked to its page,
    then the toctree of every page of the folder. The content lists pages in display order;
    the other pages follow in name order.

``.. moerouter-policy-autosummary::`` (on the API page)
    An ``autosummary`` (``:toctree: generated/``) of every policy class of
    :mod:`moerouter.policies` that declares its capabilities (``moerouter._capabilities``), as
    ``moerouter.X`` when the top level exports it, else ``moerouter.policies.X``. The content
    lists classes in display order; the others follow in name order. autosummary generates stub
    pages only for names written in an ``autosummary::`` of a source file, so this extension
    generates the policies' stubs itself when the builder starts.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from moerouter_tables import declared_policies, display_order
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import moerouter
import moerouter.policies

logger = logging.getLogger(__name__)

_ROW = re.compile(r"^\.\. moerouter-policy-row::\s*(\S+)\s*$")
_OPTION = re.compile(r"^\s+:(\w+):\s*(.*)$")


def page_rows(text: str) -> list[dict[str, str]]:
    """The ``moerouter-policy-row`` directives of a page's source, in page order."""
    rows: list[dict[str, str]] = []
    row: dict[str, str] | None = None
    key = ""
    for line in text.splitlines():
        start = _ROW.match(line)
        if start:
            row = {"name": start.group(1)}
            rows.append(row)
            continue
        if row is None:
            continue
        option = _OPTION.match(line)
        if option:
            key = option.group(1)
            row[key] = option.group(2).strip()
        elif line.strip() and line[:1].isspace() and key:
            row[key] += " " + line.strip()  # a value continued on the next line
        else:
            row, key = None, ""  # a blank line or the page again: the options are over
    return rows


class _Rst(SphinxDirective):
    def render(self, lines: list[str]) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), 0, container)
        return list(container.children)


class PolicyRow(SphinxDirective):
    """``.. moerouter-policy-row:: Name``: declares the page's row; renders nothing here."""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {
        "chooses": directives.unchanged_required,
        "experts": directives.unchanged_required,
        "use": directives.unchanged_required,
        "with": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        if name not in moerouter.policies.__all__:
            logger.warning(
                "moerouter-policy-row: %s is not a public name of moerouter.policies",
                name,
                location=self.get_location(),
            )
        for option in ("chooses", "experts", "use"):
            if option not in self.options:
                logger.warning(
                    "moerouter-policy-row: %s has no :%s:",
                    name,
                    option,
                    location=self.get_location(),
                )
        return []


class PolicyPages(_Rst):
    """``.. moerouter-policy-pages::`` with page names (no suffix) in display order."""

    has_content = True

    def run(self) -> list[nodes.Node]:
        folder = Path(self.env.doc2path(self.env.docname)).parent
        this = Path(self.env.doc2path(self.env.docname)).stem
        found = sorted(path.stem for path in folder.glob("*.rst") if path.stem != this)
        listed = [line.strip() for line in self.content if line.strip()]
        for page in sorted(set(listed) - set(found)):
            logger.warning(
                "moerouter-policy-pages: no page %s.rst", page, location=self.get_location()
            )
        pages = [page for page in listed if page in found]
        pages += [page for page in found if page not in pages]
        header = ["policy", "who chooses", "experts per token", "use it for"]
        table = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 20 20 20 40",
            "",
            *[f"   {'* -' if index == 0 else '  -'} {cell}" for index, cell in enumerate(header)],
        ]
        for page in pages:
            path = folder / f"{page}.rst"
            self.env.note_dependency(str(path))
            for row in page_rows(path.read_text(encoding="utf-8")):
                first = f":doc:`{row['name']} <{page}>`"
                if row.get("with"):
                    first += f" {row['with']}"
                cells = [first, *[row.get(key, "") for key in ("chooses", "experts", "use")]]
                table += [f"   {'* -' if i == 0 else '  -'} {c}" for i, c in enumerate(cells)]
        toctree = ["", ".. toctree::", "   :maxdepth: 1", "", *[f"   {page}" for page in pages]]
        return self.render([*table, *toctree])


def policy_api_names(order: list[str] | None = None) -> list[str]:
    """The policies' autosummary entries (relative to ``moerouter``), in display order."""
    top_level = set(moerouter.__all__)
    names = display_order(declared_policies(), order or [])
    return [name if name in top_level else f"policies.{name}" for name in names]


class PolicyAutosummary(_Rst):
    """``.. moerouter-policy-autosummary::`` with policy class names in display order."""

    has_content = True

    def run(self) -> list[nodes.Node]:
        order = [line.strip() for line in self.content if line.strip()]
        for name in order:
            if name not in declared_policies():
                logger.warning(
                    "moerouter-policy-autosummary: %s declares no capabilities "
                    "(or is not a policy)",
                    name,
                    location=self.get_location(),
                )
        lines = [
            ".. autosummary::",
            "   :toctree: generated/",
            "   :nosignatures:",
            "",
            *[f"   {name}" for name in policy_api_names(order)],
        ]
        return self.render(lines)


def generate_policy_stubs(app: Any) -> None:
    """Write the policies' autosummary stubs into ``api/generated/``, as autosummary would."""
    if not app.config.autosummary_generate:
        return
    from sphinx.ext.autosummary.generate import generate_autosummary_docs

    block = [".. currentmodule:: moerouter", "", ".. autosummary::", "   :toctree: generated/"]
    block += ["", *[f"   {name}" for name in policy_api_names()]]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "policies.rst")
        source.write_text("\n".join(block) + "\n", encoding="utf-8")
        generate_autosummary_docs(
            [str(source)],
            output_dir=Path(app.srcdir, "api", "generated"),
            suffix=".rst",
            imported_members=app.config.autosummary_imported_members,
            app=app,
            overwrite=app.config.autosummary_generate_overwrite,
        )


def setup(app: Any) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.autosummary")
    app.add_directive("moerouter-policy-row", PolicyRow)
    app.add_directive("moerouter-policy-pages", PolicyPages)
    app.add_directive("moerouter-policy-autosummary", PolicyAutosummary)
    app.connect("builder-inited", generate_policy_stubs)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
