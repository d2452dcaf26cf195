"""The ``model-zoo`` directive: a table of :func:`sc_c2s.models.available`, made when the docs are built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

if TYPE_CHECKING:
    import pandas as pd
    from sphinx.application import Sphinx


def _text(value: Any) -> nodes.Node:
    import pandas as pd

    if isinstance(value, tuple | list):
        return nodes.Text(", ".join(map(str, value)) or "–")
    if value is None or pd.isna(value):
        return nodes.Text("–")
    if isinstance(value, float):
        return nodes.Text(f"{value:.2g}" if value < 1 else f"{value:.1f}")
    return nodes.Text(str(value))


def _repo(repo: str | None) -> nodes.Node:
    if repo is None:
        return nodes.Text("bundled")
    return nodes.reference(repo, repo, refuri=f"https://huggingface.co/{repo}")


def _revision(revision: str | None) -> nodes.Node:
    return nodes.literal(text=revision[:10]) if revision else _text(None)


#: Columns of the table: header, column of :func:`sc_c2s.models.available` (``None``: the index) and formatter.
COLUMNS: Sequence[tuple[str, str | None, Callable[[Any], nodes.Node]]] = (
    ("name", None, lambda name: nodes.literal(text=name)),
    ("Hugging Face repository", "repo", _repo),
    ("revision", "revision", _revision),
    ("tasks", "tasks", _text),
    ("genes", "n_genes", _text),
    ("size (GB)", "size_gb", _text),
    ("license", "license", _text),
    ("description", "description", _text),
    ("unconfirmed", "unconfirmed", _text),
)


def table(zoo: pd.DataFrame) -> nodes.table:
    """Make a docutils table of the registry, one row per checkpoint."""
    group = nodes.tgroup(cols=len(COLUMNS))
    group += [nodes.colspec(colwidth=1) for _ in COLUMNS]
    head = nodes.row()
    head += [nodes.entry("", nodes.paragraph("", header)) for header, _, _ in COLUMNS]
    group += nodes.thead("", head)
    body = nodes.tbody()
    for name, entry in zoo.iterrows():
        row = nodes.row()
        for _, column, fmt in COLUMNS:
            row += nodes.entry("", nodes.paragraph("", "", fmt(name if column is None else entry[column])))
        body += row
    group += body
    return nodes.table("", group, classes=["model-zoo"])


class ModelZoo(SphinxDirective):
    """Insert the registry of :mod:`sc_c2s.models` as a table."""

    def run(self) -> list[nodes.Node]:
        """Return the table, built from the registry of the installed package."""
        from sc_c2s import models

        return [table(models.available())]


def setup(app: Sphinx) -> dict[str, bool]:
    """Register the directive."""
    app.add_directive("model-zoo", ModelZoo)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
