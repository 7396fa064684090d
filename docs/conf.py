"""Sphinx configuration for dask_forkmap's documentation.

Built by CI with ``sphinx-build -W --keep-going -b html docs docs/_build/html``: every warning fails
the build. Nothing here needs the network (no intersphinx inventories).
"""

from __future__ import annotations

import dask_forkmap

project = "dask_forkmap"
author = "dask_forkmap developers"
copyright = "dask_forkmap developers"
release = dask_forkmap.__version__
version = release

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown pages link to each other's sections as ``page.md#heading``.
myst_heading_anchors = 3

# numpydoc renders the docstrings; the API page lists members itself, so the per-class member
# tables (autosummary stubs numpydoc would otherwise want) are left out.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # types are in the numpydoc sections; ParamSpec signatures read badly

html_theme = "pydata_sphinx_theme"
html_title = "dask_forkmap"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}

# One level of pages: the header links and the page's own table of contents are navigation enough.
html_sidebars: dict[str, list[str]] = {"**": []}
