"""The ``model-zoo`` directive: the registry of :func:`sc_c2s.models.available`, made when the docs are built.

It writes a compact table (name, description, tasks, genes per sentence, size, license) and, below it, the details
of each checkpoint (repository and revision, base model, architecture, context, where the values come from and which
could not be confirmed). The ``model-memory`` directive writes what each checkpoint needs (parameters, memory for
inference and fine-tuning), for the page on large models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

if TYPE_CHECKING:
    import pandas as pd
    from sphinx.application import Sphinx


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, tuple | list | dict) and pd.isna(value))


def _text(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value)) or "–"
    if _missing(value):
        return "–"
    if isinstance(value, float):
        return f"{value:.2g}" if value < 1 else f"{value:.1f}"
    return str(value)


def _tasks(tasks: tuple[str, ...]) -> str:
    return _text([t.removeprefix("cell_type_") for t in tasks])


def _paragraph(*children: nodes.Node | str) -> nodes.paragraph:
    return nodes.paragraph("", "", *(nodes.Text(c) if isinstance(c, str) else c for c in children))


def _grid(headers: list[str], widths: tuple[int, ...], rows) -> nodes.table:
    """Make a table with a header row and one row of cells (paragraphs) per item of `rows`."""
    group = nodes.tgroup(cols=len(headers))
    group += [nodes.colspec(colwidth=w) for w in widths]
    head = nodes.row()
    head += [nodes.entry("", _paragraph(header)) for header in headers]
    group += nodes.thead("", head)
    body = nodes.tbody()
    for cells in rows:
        row = nodes.row()
        row += [nodes.entry("", cell) for cell in cells]
        body += row
    group += body
    return nodes.table("", group, classes=["model-zoo"])


def table(zoo: pd.DataFrame) -> nodes.table:
    """Make the summary table, one row per checkpoint."""
    columns = {
        "name": lambda name, _: [nodes.reference("", name, refid=nodes.make_id(f"model-{name}"))],
        "description": lambda _, e: [e["description"]],
        "tasks": lambda _, e: [_tasks(e["tasks"])],
        "genes": lambda _, e: [_text(e["n_genes"])],
        "size (GB)": lambda _, e: [_text(e["size_gb"])],
        "license": lambda _, e: [_text(e["license"])],
    }
    rows = ([_paragraph(*cell(name, entry)) for cell in columns.values()] for name, entry in zoo.iterrows())
    return _grid(list(columns), (3, 5, 2, 1, 1, 2), rows)


def details(zoo: pd.DataFrame) -> nodes.definition_list:
    """Make one definition per checkpoint with where it comes from and how it was built."""
    items = nodes.definition_list()
    for name, e in zoo.iterrows():
        if _missing(e["repo"]):
            source = _paragraph("Bundled with the package; no download.")
        else:
            link = nodes.reference("", e["repo"], refuri=f"https://huggingface.co/{e['repo']}")
            source = _paragraph("Hugging Face: ", link, " at revision ", nodes.literal(text=e["revision"]), ".")
        facts = (
            f"Base model {_text(e['base_model'])}; {_text(e['architecture'])}; context {_text(e['context_length'])} "
            f"tokens; prompt style {_text(e['prompt_style'])}; organism {_text(e['organism'])}."
        )
        definition = nodes.definition("", source, _paragraph(facts), _paragraph(f"Source: {e['source']}"))
        if len(e["unconfirmed"]):
            definition += _paragraph(f"Not confirmed there: {_text(e['unconfirmed'])}.")
        term = nodes.term("", "", nodes.literal(text=name))
        items += nodes.definition_list_item("", term, definition, ids=[nodes.make_id(f"model-{name}")])
    return items


def memory(zoo: pd.DataFrame) -> nodes.table:
    """Make the table of what each checkpoint needs: parameters and GiB for inference and LoRA fine-tuning."""
    columns = {
        "name": "name",
        "parameters (billions)": "parameters",
        "bf16": "inference_bf16_gib",
        "8-bit": "inference_8bit_gib",
        "4-bit": "inference_4bit_gib",
        "LoRA": "lora_gib",
        "QLoRA": "qlora_gib",
    }
    rows = (
        [
            _paragraph(nodes.literal(text=name)),
            *(_paragraph(_text(entry[column])) for column in list(columns.values())[1:]),
        ]
        for name, entry in zoo.iterrows()
    )
    return _grid(list(columns), (4, 2, 1, 1, 1, 1, 1), rows)


class ModelMemory(SphinxDirective):
    """Insert the memory each checkpoint of the registry needs, from :func:`sc_c2s.models.available`."""

    def run(self) -> list[nodes.Node]:
        """Return the table, built from the estimates of the installed package."""
        from sc_c2s import models
        from sc_c2s.models import _memory

        self.env.note_dependency(_memory.__file__)
        return [memory(models.available())]


class ModelZoo(SphinxDirective):
    """Insert the registry of :mod:`sc_c2s.models`: a table and the details of each checkpoint."""

    def run(self) -> list[nodes.Node]:
        """Return the nodes, built from the registry of the installed package."""
        from sc_c2s import models
        from sc_c2s.models import _registry

        # rebuild the page when the registry changes
        self.env.note_dependency(models.available.__code__.co_filename)
        self.env.note_dependency(str(Path(_registry.__file__).with_name(_registry.REGISTRY_FILE)))
        zoo = models.available()
        return [table(zoo), nodes.rubric("", "Details"), details(zoo)]


def setup(app: Sphinx) -> dict[str, bool]:
    """Register the directives."""
    app.add_directive("model-zoo", ModelZoo)
    app.add_directive("model-memory", ModelMemory)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
