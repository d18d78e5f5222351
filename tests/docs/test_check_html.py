"""docs/check_html.py finds what would break offline, and the built site (when present) has none.

``nox -s docs`` runs the checker on the site it builds; these tests prove the checker itself finds
each kind of remote load and a math page without the local renderer, on tiny hand-made sites.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
_spec = importlib.util.spec_from_file_location("check_html", DOCS / "check_html.py")
assert _spec is not None and _spec.loader is not None
check_html = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_html)

MATH = '<div class="math notranslate nohighlight">\\[x^2\\]</div>'
LOCAL_MATHJAX = '<script defer="defer" src="{up}_static/mathjax/tex-chtml.js"></script>'


def site(tmp_path, pages, *, renderer=True, css=""):
    """A site with ``pages`` ({path: html body}), the MathJax file and one stylesheet."""
    for name, body in pages.items():
        page = tmp_path / name
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"<html><head></head><body>{body}</body></html>", encoding="utf-8")
    if renderer:
        (tmp_path / "_static/mathjax").mkdir(parents=True)
        (tmp_path / check_html.MATHJAX).write_text("// MathJax", encoding="utf-8")
    (tmp_path / "_static").mkdir(exist_ok=True)
    (tmp_path / "_static/theme.css").write_text(css, encoding="utf-8")
    return tmp_path


def test_a_clean_site_passes(tmp_path):
    # Local scripts and stylesheets, a math page in a sub-folder loading the renderer relatively,
    # and a clickable link to another host (reading it needs network, loading the page does not).
    root = site(
        tmp_path,
        {
            "index.html": '<script src="_static/theme.js"></script>'
            '<link rel="stylesheet" href="_static/theme.css">'
            '<a href="https://arxiv.org/abs/2101.03961">paper</a>',
            "policies/topk.html": LOCAL_MATHJAX.format(up="../") + MATH,
        },
        css="body { background: url(../images/bg.png); }",
    )
    assert check_html.check_site(root) == []


@pytest.mark.parametrize(
    "body",
    [
        # The CDN MathJax Sphinx loads by default: the bug this checker exists for.
        '<script defer src="https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"></script>',
        # A protocol-relative address is remote too.
        '<script src="//cdn.example.org/lib.js"></script>',
        # A stylesheet from a font service.
        '<link rel="stylesheet" href="https://fonts.example.org/css?family=Lato">',
        # A preloaded font.
        '<link rel="preload" as="font" href="http://fonts.example.org/lato.woff2">',
        # An image (a CI badge).
        '<img src="https://img.example.org/badge.svg">',
        # An inline style importing a remote stylesheet.
        '<style>@import url("https://fonts.example.org/x.css");</style>',
    ],
)
def test_remote_loads_are_found(tmp_path, body):
    problems = check_html.check_site(site(tmp_path, {"index.html": body}))
    assert len(problems) == 1
    assert problems[0].startswith("index.html:") and "from another host" in problems[0]


def test_a_stylesheet_pulling_in_a_remote_font_is_found(tmp_path):
    root = site(
        tmp_path, {"index.html": ""}, css="@font-face { src: url(https://f.example/a.woff) }"
    )
    assert check_html.check_site(root) == [
        "_static/theme.css: stylesheet pulls in https://f.example/a.woff from another host"
    ]


def test_a_math_page_without_the_local_renderer_is_found(tmp_path):
    root = site(tmp_path, {"losses.html": MATH})
    assert check_html.check_site(root) == [
        "losses.html: has math but does not load the local _static/mathjax/tex-chtml.js"
    ]


def test_a_math_page_whose_renderer_file_is_missing_is_found(tmp_path):
    root = site(tmp_path, {"losses.html": LOCAL_MATHJAX.format(up="") + MATH}, renderer=False)
    assert check_html.check_site(root) == [
        "losses.html: loads _static/mathjax/tex-chtml.js, which is missing from the site"
    ]


def test_an_empty_folder_is_not_a_passing_site(tmp_path):
    assert check_html.check_site(tmp_path) == [f"{tmp_path}: no HTML pages (build the docs first)"]


BUILT = DOCS / "_build" / "html"


@pytest.mark.skipif(not (BUILT / "index.html").is_file(), reason="docs not built (nox -s docs)")
def test_the_built_site_works_offline():
    assert check_html.check_site(BUILT) == []
