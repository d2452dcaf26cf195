"""Sphinx configuration of the sc_c2s documentation."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from sphinx.deprecation import RemovedInSphinx10Warning

if TYPE_CHECKING:
    from sphinx.application import Sphinx

HERE = Path(__file__).parent
# sphinx-autodoc-typehints 3.6 calls an API that Sphinx 9 deprecates; nothing for us to act on
warnings.filterwarnings("ignore", r".*set_application", RemovedInSphinx10Warning, "sphinx_autodoc_typehints.*")
sys.path.insert(0, str(HERE / "extensions"))

# -- Project information -----------------------------------------------------

info = metadata("sc-c2s")
project = "sc_c2s"
author = info["Author"] or "sc_c2s developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = version
repository_url = "https://github.com/scverse/sc_c2s"

# -- General configuration ---------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon, so that it sees the parsed parameters
    "sphinx_copybutton",
    "sphinx_design",
    "sphinxcontrib.bibtex",
    "model_zoo",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb", ".md": "myst-nb"}
master_doc = "index"
default_role = "literal"
nitpicky = True
needs_sphinx = "7.0"

# tutorials are committed with their outputs; tests/test_notebooks.py executes them
nb_execution_mode = "off"
nb_merge_streams = True
# progress bars (stderr) say nothing once the notebook has run
nb_output_stderr = "remove"
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image", "html_admonition"]
myst_heading_anchors = 3
myst_url_schemes = ("http", "https", "mailto")

bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True  # having a separate entry generally helps readability
napoleon_use_param = True
# prose "Returns" sections (scverse style) stay prose; the return type comes from the annotation
napoleon_custom_sections = [("Params", "Parameters"), "Returns"]
typehints_defaults = "braces"
always_use_bars_union = True

# -- Cross-references --------------------------------------------------------

intersphinx_mapping = {
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "cycler": ("https://matplotlib.org/cycler/", None),
    "dask": ("https://docs.dask.org/en/stable/", None),
    "distributed": ("https://distributed.dask.org/en/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "mudata": ("https://mudata.readthedocs.io/en/latest/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    "python": ("https://docs.python.org/3", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
}
# Hugging Face's docs are not built with Sphinx, so they have no inventory to link to.
nitpick_ignore_regex = [(r"py:.*", r"(transformers|tokenizers)\..*")]
# the rank fit's container is private; it is documented where it is read (``uns["c2s"]["rank_fit"]``)
nitpick_ignore = [("py:class", "sc_c2s._rank_model.RankFit")]
#: sphinx-autodoc-typehints names classes by the module that defines them; their projects document the public name.
QUALNAME_OVERRIDES = {
    "anndata._core.anndata.AnnData": "anndata.AnnData",
    "distributed.client.Client": "distributed.Client",
    "mudata._core.mudata.MuData": "mudata.MuData",
    "matplotlib.axes._axes.Axes": "matplotlib.axes.Axes",
    "pandas.core.frame.DataFrame": "pandas.DataFrame",
    "pandas.core.indexes.base.Index": "pandas.Index",
    "pandas.core.series.Series": "pandas.Series",
}


def _online(host: str = "docs.python.org") -> bool:
    """Whether the inventories can be fetched; ``SC_C2S_DOCS_OFFLINE=1`` says no without trying."""
    if os.environ.get("SC_C2S_DOCS_OFFLINE", "") not in {"", "0"}:
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


if not _online():
    # Offline (CI machines without internet): no inventories, so references into other projects cannot
    # resolve. Accept them unlinked rather than failing `sphinx-build -W`; online builds (Read the Docs) check them.
    intersphinx_mapping = {}
    external = "|".join(
        ["anndata", "cycler", "dask", "distributed", "mudata", "numpy", "np", "pandas", "pd", "scanpy", "scipy"]
        + ["matplotlib"]
        + ["torch"]
        + ["collections", "typing", "pathlib", "os"]  # Python's own
    )
    nitpick_ignore_regex.append((r"py:.*", rf"({external})(\..*)?"))

# -- HTML output -------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "sc_c2s"
html_theme_options = {
    "repository_url": repository_url,
    "repository_branch": "main",
    "path_to_docs": "docs/",
    "use_repository_button": True,
    "use_issues_button": True,
    "navigation_with_keys": False,
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sphinx = False
pygments_style = "default"


def _public_name(app: Sphinx, env, node, contnode):
    """Resolve a reference to a class by its defining module through the class's public name."""
    from sphinx.ext.intersphinx import missing_reference

    public = QUALNAME_OVERRIDES.get(node.get("reftarget"))
    if public is None:
        return None
    node["reftarget"] = public
    return missing_reference(app, env, node, contnode)


def setup(app: Sphinx) -> None:
    """Link classes by their public names, and keep prose "Returns" sections as they are written.

    sphinx-autodoc-typehints inserts a ``:`` line under every numpy "Returns" header, for napoleon's field parser;
    here "Returns" is a plain section (see ``napoleon_custom_sections``), where that line would show up as text.
    """
    from sphinx_autodoc_typehints.patches import napoleon_numpy_docstring_return_type_processor

    app.connect("missing-reference", _public_name, priority=400)
    for listener in list(app.events.listeners["autodoc-process-docstring"]):
        if listener.handler is napoleon_numpy_docstring_return_type_processor:
            app.disconnect(listener.id)
