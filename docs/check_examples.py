"""Run every Python example in the documentation pages.

Each ``.. code-block:: python`` in a page runs in order, in one namespace per page, so a later
block may use names from an earlier one. A block preceded by the comment ``.. skip-example``
(a reST comment, invisible in the HTML) is not run. Functions named ``test_*`` that a page defines
are then called with NumPy as ``xp``, as the pytest fixture would. Usage::

    python docs/check_examples.py            # every page under docs/
    python docs/check_examples.py concepts   # pages whose path contains "concepts"
"""

from __future__ import annotations

import re
import sys
import textwrap
import traceback
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BLOCK = re.compile(r"^( *)\.\. code-block:: python\n((?:\1 +:.*\n)*)\n((?:\1 +.*\n|\n)+)", re.M)


def blocks(text: str) -> list[tuple[int, str]]:
    found = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        if before and before[-1].strip() == ".. skip-example":
            continue
        line = text[: match.start()].count("\n") + 1
        found.append((line, textwrap.dedent(match.group(3))))
    return found


def main(filters: list[str]) -> int:
    failures = 0
    pages = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)
    skipped = {"generated", "_templates", "auto_examples"}  # auto_examples: the gallery runs them
    pages = [p for p in pages if not skipped & set(p.parts)]
    for page in pages:
        name = str(page.relative_to(DOCS))
        if filters and not any(f in name for f in filters):
            continue
        namespace: dict[str, object] = {"__name__": "__docs__"}
        for line, code in blocks(page.read_text()):
            try:
                exec(compile(code, f"{name}:{line}", "exec"), namespace)
            except Exception:
                failures += 1
                print(f"FAILED {name}:{line}")
                traceback.print_exc()
            else:
                print(f"ok     {name}:{line}")
        for test_name, test in list(namespace.items()):
            if test_name.startswith("test_") and callable(test):
                import numpy

                try:
                    test(xp=numpy)
                except Exception:
                    failures += 1
                    print(f"FAILED {name}:{test_name}(xp=numpy)")
                    traceback.print_exc()
                else:
                    print(f"ok     {name}:{test_name}(xp=numpy)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
