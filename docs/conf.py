"""Sphinx configuration for the moerouter documentation.

The build must work offline: no intersphinx, no remote images, no sphinx-gallery.
"""

from __future__ import annotations

import moerouter

project = "moerouter"
author = "the moerouter developers"
copyright = "the moerouter developers"  # noqa: A001 (Sphinx's name)
release = moerouter.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "check_examples.py", "requirements.txt"]
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
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_static_path: list[str] = []
html_show_sourcelink = False



def setup(app):  # noqa: ANN001, ANN201
    from dataclasses import fields, is_dataclass

    field_names: set[str] = set()
    for cls in (
        moerouter.TopK,
        moerouter.NullExperts,
        moerouter.ExpertChoice,
        moerouter.Routing,
        moerouter.Plan,
        moerouter.BackendInfo,
    ):
        if is_dataclass(cls):
            field_names.update(f.name for f in fields(cls))

    def skip(app, what, name, obj, skip, options):  # noqa: ANN001, ANN202
        if what == "class" and name in field_names:
            return True
        return None

    app.connect("autodoc-skip-member", skip)
