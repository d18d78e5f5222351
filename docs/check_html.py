"""Check a built HTML site for what would break without network.

1. No page loads a script, stylesheet, font, image or frame from another host (``http://``,
   ``https://`` or protocol-relative ``//host`` addresses), and no stylesheet of the site pulls
   one in with ``@import`` or ``url(...)``. Links a reader clicks (``<a href>``) are fine.
2. Every page with math (Sphinx marks it ``class="math"``) loads the MathJax copy shipped in the
   site, and that file exists: the formulas render on a machine with no network.

Usage::

    python docs/check_html.py docs/_build/html

``nox -s docs`` runs it after ``sphinx-build``; tests/docs/test_check_html.py tests the checker.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

#: The renderer a math page must load, relative to the site root (sphinx-mathjax-offline).
MATHJAX = "_static/mathjax/tex-chtml.js"

# <link rel=...> values that make the browser fetch the target when the page loads.
_LOADING_RELS = frozenset(
    {"stylesheet", "preload", "modulepreload", "prefetch", "icon", "shortcut", "manifest"}
)
_LOADING_TAGS = {"script": "src", "img": "src", "iframe": "src", "source": "src", "embed": "src"}
_CSS_URL = re.compile(r"""(?:@import\s+(?:url\()?|url\()\s*["']?([^"')\s;]+)""")


def is_remote(address: str) -> bool:
    """True for an address on another host: ``http(s)://...`` or ``//host/...``."""
    address = address.strip()
    if address.startswith("//"):
        return True
    return urlsplit(address).scheme in {"http", "https", "ftp"}


class _PageScan(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []  # (tag, address) of everything fetched on load
        self.has_math = False
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if "math" in values.get("class", "").split():
            self.has_math = True
        if tag in _LOADING_TAGS and values.get(_LOADING_TAGS[tag]):
            self.loads.append((tag, values[_LOADING_TAGS[tag]]))
        if tag == "link" and _LOADING_RELS & set(values.get("rel", "").lower().split()):
            self.loads.append((f"link rel={values['rel']}", values.get("href", "")))
        self.in_style = self.in_style or tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self.in_style = self.in_style and tag != "style"

    def handle_data(self, data: str) -> None:
        if self.in_style:
            self.loads.extend(("style", address) for address in _CSS_URL.findall(data))


def _local_target(page: Path, address: str) -> Path:
    path = urlsplit(address).path
    return (page.parent / path).resolve()


def check_site(root: Path) -> list[str]:
    """Every problem found under the built site ``root``, one line each (empty: all good)."""
    root = Path(root)
    problems: list[str] = []
    pages = sorted(root.rglob("*.html"))
    if not pages:
        return [f"{root}: no HTML pages (build the docs first)"]
    renderer = (root / MATHJAX).resolve()
    for page in pages:
        name = page.relative_to(root).as_posix()
        scan = _PageScan()
        scan.feed(page.read_text(encoding="utf-8"))
        for tag, address in scan.loads:
            if is_remote(address):
                problems.append(f"{name}: <{tag}> loads {address} from another host")
        if scan.has_math:
            scripts = {_local_target(page, a) for tag, a in scan.loads if tag == "script"}
            if renderer not in scripts:
                problems.append(f"{name}: has math but does not load the local {MATHJAX}")
            elif not renderer.is_file():
                problems.append(f"{name}: loads {MATHJAX}, which is missing from the site")
    for stylesheet in sorted(root.rglob("*.css")):
        for address in _CSS_URL.findall(stylesheet.read_text(encoding="utf-8", errors="replace")):
            if is_remote(address):
                name = stylesheet.relative_to(root).as_posix()
                problems.append(f"{name}: stylesheet pulls in {address} from another host")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    problems = check_site(Path(argv[0]))
    for problem in problems:
        print(problem)
    pages = len(list(Path(argv[0]).rglob("*.html")))
    print(f"check_html: {pages} pages, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
