"""Sphinx configuration for the moerouter documentation.

The site must work offline: no intersphinx, no remote images, and MathJax is served from the
site itself (sphinx-mathjax-offline copies MathJax 3 into ``_static/mathjax``), so formulas render
on a machine with no network. ``python docs/check_html.py docs/_build/html`` checks both.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import moerouter

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "moerouter"
author = "the moerouter developers"
copyright = "the moerouter developers"
release = moerouter.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # sets mathjax_path to the copy it ships (MathJax 3.2.2)
    "numpydoc",
    "moerouter_tables",  # docs/_ext: support tables rendered from the code
    "moerouter_transformers_table",  # docs/_ext: transformers families, from the code
    "moerouter_policy_pages",  # docs/_ext: the policies index and API list, from pages and code
    "sphinx_gallery.gen_gallery",
]

# The gallery: examples/plot_*.py run at build time, their figures and output embedded. They
# live at the repository root, next to the code, so they are runnable scripts for a reader of the
# repository as well as pages of the site.
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"plot_",  # run every example
    "within_subsection_order": "FileNameSortKey",  # plot_01_... first
    "abort_on_example_error": True,  # a failing example fails the build
    "remove_config_comments": True,
    "download_all_examples": False,
    "show_signature": False,
    # Its timing page loads jQuery DataTables from a CDN; the build log prints the same times.
    "write_computation_times": False,
}

# textmacros: text-mode macros such as \_ inside \texttt{...} (parameter names in formulas);
# MathJax 3 leaves them raw without it.
mathjax3_config = {
    "loader": {"load": ["[tex]/textmacros"]},
    "tex": {"packages": {"[+]": ["textmacros"]}},
}

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "check_examples.py",
    "check_html.py",
    "_ext",
    "requirements.txt",
]
root_doc = "index"
default_role = "py:obj"
nitpicky = False

# autosummary writes one page per public name into api/generated/ (gitignored).
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"  # the numpydoc "Parameters" sections carry the types

# numpydoc renders Parameters/Attributes itself; autosummary tables of members would duplicate
# the dataclass fields listed under "Attributes".
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "pydata_sphinx_theme"
html_title = f"moerouter {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    # The generated support tables need the width of the page's table of contents.
    "secondary_sidebar_items": {
        "**": ["page-toc"],
        "index": [],
        "backends": [],
        "policies/index": [],
    },
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_static_path: list[str] = []
html_show_sourcelink = False


def setup(app: Any) -> None:
    """Leave dataclass fields to the docstrings' Attributes and Parameters sections.

    The class template documents members with ``:members:``; on a dataclass that would list every
    field a second time. Properties and methods (``Routing.fan_in``, ``ExpertChoice.capacity``,
    ``__call__``) are still documented.
    """
    field_names = {
        field.name
        for cls in (
            moerouter.TopK,
            moerouter.NullExperts,
            moerouter.ExpertChoice,
            moerouter.Routing,
            moerouter.Plan,
            moerouter.BackendInfo,
        )
        for field in fields(cls)
    }

    def skip_fields(app: Any, what: str, name: str, obj: Any, skip: bool, options: Any) -> Any:
        return True if what == "class" and name in field_names else None

    app.connect("autodoc-skip-member", skip_fields)
