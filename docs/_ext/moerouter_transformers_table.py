"""``.. moerouter-transformers-families::``: the transformers support table, from the code.

One row per family of ``moerouter_torch.integrations.transformers_families.FAMILIES`` (the table
``backends/torch/tests/test_transformers_families.py`` checks against the installed
transformers): family, status, reproducing policy, whether ``to_adamoe`` applies, and why a
family is refused or not built.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

YES, NO = "✓", "—"


class TransformersFamilies(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from moerouter_torch.integrations.transformers_families import FAMILIES

        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 18 12 22 8 40",
            "",
            "   * - family",
            "     - status",
            "     - policy",
            "     - AdaMoE",
            "     - note",
        ]
        for name, family in sorted(FAMILIES.items()):
            policy = f"``{family.policy}`` ({family.score})" if family.policy else NO
            note = (family.refused or family.not_built or family.no_adamoe).replace("*", r"\*")
            lines += [
                f"   * - ``{name}``",
                f"     - {family.status}",
                f"     - {policy}",
                f"     - {YES if family.adamoe else NO}",
                f"     - {note}",
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="transformers_families"), 0, container)
        return list(container.children)


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("moerouter-transformers-families", TransformersFamilies)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
