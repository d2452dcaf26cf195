"""Prompt strings in the format of the published C2S checkpoints.

The functions here build the exact text a model reads, so they also serve to prompt other language models with
cell sentences. A training sample is ``prompt + answer(text)``: :func:`answer` begins with a space by default
(``prefix=""`` for what the published fine-tuning code puts between them: nothing). The published checkpoints
were trained on upper-cased gene names and the top 200 genes. ``{num_genes}`` in a template is the number of
genes asked for (the caller's `n_genes`), not the length of a shorter sentence.

The multi-cell templates of C2S-Scale write a group of cells as ``Cell {i}:`` (1-based), a newline, the cell's
sentence and ``.``, a newline, for each cell (:func:`multi_cell_sentences`); the template then adds its own
``.`` and newline, so a line holding a single ``.`` precedes the question.

Examples
--------
>>> from sc_c2s import prompts
>>> print(prompts.cell_type_prediction(["CD3D", "IL7R"], n_genes=2, organism="Homo sapiens"))
The following is a list of 2 gene names ordered by descending expression level in a Homo sapiens cell. Your task is to give the cell type which this cell belongs to based on its gene expression.
Cell sentence: CD3D IL7R.
The cell type corresponding to these genes is:
>>> prompts.answer("CD4 T cell")
' CD4 T cell.'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from ._utils._validate import check_flag, check_positive_int

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

__all__ = [
    "CELL_TYPE_GENERATION",
    "CELL_TYPE_PREDICTION",
    "PERTURBATION",
    "SUMMARY",
    "SUMMARY_PARAPHRASES",
    "TISSUE_GENERATION",
    "TISSUE_PREDICTION",
    "answer",
    "cell_sentence",
    "cell_type_generation",
    "cell_type_prediction",
    "cell_type_prediction_prompts",
    "multi_cell_sentences",
    "perturbation",
    "sentence_words",
    "summary",
    "tissue_generation",
    "tissue_prediction",
]

Organism = Literal["Homo sapiens", "Mus musculus"]
ORGANISMS: tuple[str, ...] = ("Homo sapiens", "Mus musculus")

#: Template of the cell-type prediction task; the answer follows as ``" {cell_type}."``.
CELL_TYPE_PREDICTION = (
    "The following is a list of {num_genes} gene names ordered by descending expression level in a {organism} "
    "cell. Your task is to give the cell type which this cell belongs to based on its gene expression.\n"
    "Cell sentence: {cell_sentence}.\n"
    "The cell type corresponding to these genes is:"
)
#: Template of the conditional generation task; the answer follows as ``" {cell_sentence}."``.
CELL_TYPE_GENERATION = (
    "Generate a list of {num_genes} genes in order of descending expression which represent a {organism} cell "
    "of cell type {cell_type}.\n"
    "Cell sentence:"
)
#: Template of the tissue prediction task (C2S-Scale); the answer follows as ``" {tissue}."``.
TISSUE_PREDICTION = (
    "The following is a list of {num_genes} gene names ordered by descending expression level for {num_cells} "
    "different {organism} cells. Your task is to give the tissue which these cells belong to based on their gene "
    "expression.\n"
    "Cell sentences:\n"
    "{multi_cell_sentences}.\n"
    "The tissue which these cells belong to is:"
)
#: Template of tissue-conditioned multi-cell generation (C2S-Scale; it ends with a newline); the answer follows
#: as ``" {multi_cell_sentences}."``.
TISSUE_GENERATION = (
    "Generate a list of {num_genes} genes in order of descending expression for {num_cells} different {organism} "
    "cells from a {tissue} tissue.\n"
    "Cell sentences:\n"
)
#: Template of the natural-language summary of a group of cells (C2S-Scale; no ``Cell sentences:`` line); the
#: answer follows as ``" {abstract}."``.
SUMMARY = (
    "The following is a list of {num_genes} gene names ordered by descending expression level for {num_cells} "
    "different {organism} cells. Your task is to produce an abstract summary summarizing the biological "
    "information contained in these cells.\n"
    "{multi_cell_sentences}.\n"
    "Abstract summary:"
)
#: Paraphrases of the summary instruction (ours, not published), to vary the prompt in training; the published
#: :data:`~sc_c2s.prompts.SUMMARY` stays the prompt at inference.
SUMMARY_PARAPHRASES: tuple[str, ...] = (
    "Below are the {num_genes} most expressed genes, in descending order, of {num_cells} {organism} cells. Write "
    "an abstract that summarizes what these cells tell about biology.\n"
    "{multi_cell_sentences}.\n"
    "Abstract summary:",
    "Here are {num_cells} {organism} cells, each given as its {num_genes} top genes ordered by descending "
    "expression. Summarize the biological information these cells contain, as the abstract of a study would.\n"
    "{multi_cell_sentences}.\n"
    "Abstract summary:",
)
#: Words of the templates (and of the ``Cell {i}:`` lines), for word-level tokenizers.
TEMPLATE_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        re.sub(
            r"\{(num_genes|num_cells|cell_sentence|cell_type|tissue|multi_cell_sentences)\}",
            " ",
            " ".join(
                (CELL_TYPE_PREDICTION, CELL_TYPE_GENERATION, TISSUE_PREDICTION, TISSUE_GENERATION, SUMMARY)
                + SUMMARY_PARAPHRASES
            ),
        )
        .replace("{organism}", " ".join(ORGANISMS))
        .replace(".", " ")
        .replace(":", " ")
        .replace(",", " ")
        .split()
    )
)


# Perturbation response (the published fine-tuning format): the prompt holds a control cell's sentence, the answer
# is a perturbed cell's sentence.
#: Template of the perturbation task; the answer follows as ``" {perturbed_cell_sentence}."``.
PERTURBATION = (
    "Given the following cell sentence of {num_genes} expressed genes representing a cell's basal state, predict "
    "the cell sentence after applying the perturbation: {perturbation_name}.\n"
    "Control cell sentence: {control_cell_sentence}.\n"
    "\n"
    "Perturbed cell sentence:"
)
#: Words of the perturbation template that :data:`TEMPLATE_WORDS` lacks. A word-level tokenizer gets them when its
#: model trains the perturbation task, so models of the other tasks keep their vocabulary and seeded weights.
PERTURBATION_WORDS: tuple[str, ...] = tuple(
    word
    for word in dict.fromkeys(
        re.sub(r"[.:,]", " ", PERTURBATION.format(num_genes="", perturbation_name="", control_cell_sentence="")).split()
    )
    if word not in TEMPLATE_WORDS
)


def check_organism(organism: str) -> str:
    """Return `organism` if the published prompts know it, else raise a clear error."""
    if organism not in ORGANISMS:
        msg = f"`organism` must be one of {ORGANISMS}, got {organism!r}."
        raise ValueError(msg)
    return organism


def cell_sentence(words: Sequence[str], *, upper: bool = True) -> str:
    """Join gene names into a sentence, upper-cased as the published checkpoints expect by default.

    Each name must be one word: a name with a space, an empty or a missing one would be read back as other genes.
    A cell without genes gives an empty sentence.
    """
    check_flag(upper, "upper")
    if isinstance(words, str):
        msg = (
            "`words` must be a list of gene names, not one string: split a sentence with `sentence.split()`, or take "
            "the words of ranked cells with `sc_c2s.prompts.sentence_words(adata)`."
        )
        raise TypeError(msg)
    try:
        sentence = " ".join(words)
    except TypeError:
        bad = next(word for word in words if not isinstance(word, str))
        msg = f"Gene names must be strings, got {bad!r} (a missing name?); drop it, or name the gene."
        raise TypeError(msg) from None
    if sentence.split() != list(words):
        bad = next(word for word in words if word.split() != [word])
        msg = f"Gene names must be single words (no spaces, not empty), got {bad!r}; rename the gene."
        raise ValueError(msg)
    return sentence.upper() if upper else sentence


def _one_line(text: str, name: str) -> str:
    """Return `text` if it is a non-empty string of one line (a prompt names it in a sentence of its own), else raise."""
    if not isinstance(text, str) or not text.strip() or "\n" in text or "\r" in text:
        msg = f"`{name}` must be a non-empty string of one line, got {text!r}."
        raise ValueError(msg)
    return text


def _cells(cells: Sequence[Sequence[str]], n_genes: int) -> list[Sequence[str]]:
    """Return the words of a group of cells, each cut to `n_genes`; refuse a group without cells."""
    if isinstance(cells, str) or not len(cells):
        msg = f"`cells` must be a non-empty list of cells, each a list of gene names, got {cells!r}."
        raise ValueError(msg)
    return [words[:n_genes] for words in cells]


def cell_type_prediction(
    words: Sequence[str], *, n_genes: int | None = None, organism: Organism = "Homo sapiens", upper: bool = True
) -> str:
    """Prompt asking for the cell type of the cell whose ranked genes are `words`.

    ``{num_genes}`` in the template is `n_genes`, the number of genes asked for, as the published code formats it
    (a cell expressing fewer genes has a shorter sentence; a longer one is cut to `n_genes`); ``None`` takes
    ``len(words)``.
    """
    check_positive_int(n_genes, "n_genes", none_ok=True)
    return CELL_TYPE_PREDICTION.format(
        num_genes=len(words) if n_genes is None else n_genes,
        organism=check_organism(organism),
        cell_sentence=cell_sentence(words[:n_genes], upper=upper),
    )


def cell_type_generation(cell_type: str, *, n_genes: int, organism: Organism = "Homo sapiens") -> str:
    """Prompt asking for a cell sentence of `n_genes` genes for a cell of `cell_type`.

    `n_genes` may be 0 where the answer is the empty sentence of a cell that expresses no gene.
    """
    empty = type(n_genes) is int and n_genes == 0
    return CELL_TYPE_GENERATION.format(
        num_genes=n_genes if empty else check_positive_int(n_genes, "n_genes"),
        organism=check_organism(organism),
        cell_type=_one_line(cell_type, "cell_type"),
    )


def perturbation(
    control_words: Sequence[str], *, perturbation_name: str, n_genes: int | None = None, upper: bool = True
) -> str:
    """Prompt asking for the sentence of the cell whose basal state is `control_words` after `perturbation_name`.

    ``{num_genes}`` in the template is `n_genes`, the number of genes asked for, as in the other templates (a cell
    expressing fewer genes has a shorter sentence; a longer one is cut to `n_genes`); ``None`` takes
    ``len(control_words)``. The answer is the perturbed cell's sentence (:func:`answer` of :func:`cell_sentence`).
    """
    check_positive_int(n_genes, "n_genes", none_ok=True)
    return PERTURBATION.format(
        num_genes=len(control_words) if n_genes is None else n_genes,
        perturbation_name=_one_line(perturbation_name, "perturbation_name"),
        control_cell_sentence=cell_sentence(control_words[:n_genes], upper=upper),
    )


def multi_cell_sentences(cells: Sequence[Sequence[str]], *, upper: bool = True) -> str:
    r"""Write a group of cells as the multi-cell templates read them: ``Cell {i}:``, newline, sentence, ``.``, newline.

    Cells are numbered from 1, in the order given; the text ends with a newline.

    Examples
    --------
    >>> from sc_c2s import prompts
    >>> prompts.multi_cell_sentences([["CD3D", "IL7R"], ["MS4A1"]])
    'Cell 1:\nCD3D IL7R.\nCell 2:\nMS4A1.\n'
    """
    cells = [cells] if isinstance(cells, str) else list(cells)
    if any(isinstance(words, str) for words in cells):
        msg = (
            "`cells` must be a list of cells, each a list of gene names, got strings: split each sentence with "
            "`sentence.split()`."
        )
        raise TypeError(msg)
    return "".join(f"Cell {i}:\n{cell_sentence(words, upper=upper)}.\n" for i, words in enumerate(cells, start=1))


def tissue_prediction(
    cells: Sequence[Sequence[str]], *, n_genes: int, organism: Organism = "Homo sapiens", upper: bool = True
) -> str:
    """Prompt asking for the tissue of a group of cells whose ranked genes are `cells` (one list per cell).

    Each cell is cut to `n_genes`, the number of genes the prompt names.
    """
    cells = _cells(cells, check_positive_int(n_genes, "n_genes"))
    return TISSUE_PREDICTION.format(
        num_genes=n_genes,
        num_cells=len(cells),
        organism=check_organism(organism),
        multi_cell_sentences=multi_cell_sentences(cells, upper=upper),
    )


def tissue_generation(tissue: str, *, n_cells: int, n_genes: int, organism: Organism = "Homo sapiens") -> str:
    """Prompt asking for `n_cells` cell sentences of `n_genes` genes each, of cells from `tissue`."""
    return TISSUE_GENERATION.format(
        num_genes=check_positive_int(n_genes, "n_genes"),
        num_cells=check_positive_int(n_cells, "n_cells"),
        organism=check_organism(organism),
        tissue=_one_line(tissue, "tissue"),
    )


def summary(
    cells: Sequence[Sequence[str]],
    *,
    n_genes: int,
    organism: Organism = "Homo sapiens",
    upper: bool = True,
    template: str = SUMMARY,
) -> str:
    """Prompt asking for an abstract summary of a group of cells whose ranked genes are `cells`.

    Each cell is cut to `n_genes`, the number of genes the prompt names. `template` may be one of
    :data:`~sc_c2s.prompts.SUMMARY_PARAPHRASES` instead of the published :data:`~sc_c2s.prompts.SUMMARY`, or another
    text with the same placeholders.
    """
    cells = _cells(cells, check_positive_int(n_genes, "n_genes"))
    fields = {
        "num_genes": n_genes,
        "num_cells": len(cells),
        "organism": check_organism(organism),
        "multi_cell_sentences": multi_cell_sentences(cells, upper=upper),
    }
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as error:
        placeholders = ", ".join(f"{{{name}}}" for name in fields)
        msg = f"`template` may use the placeholders {placeholders} only, not {error}."
        raise ValueError(msg) from None


def answer(text: str, *, prefix: str = " ") -> str:
    """Format an answer as it follows a prompt in training: `prefix` (a space by default), the text, a period.

    The published fine-tuning code joins prompt and answer with nothing between (``prefix=""``).
    """
    return f"{prefix}{text}."


def sentence_words(adata: AnnData | MuData, *, n_genes: int | None = 200, mod: str | None = None) -> list[list[str]]:
    """Gene words of each cell's sentence, best first, from ``obsm["c2s_genes"]``, truncated to `n_genes`.

    Warns when the sentences were ranked with fewer genes than `n_genes` (``to_sentences(n_genes=...)``): prompts
    would then say `n_genes` genes over shorter sentences.
    """
    from ._data import DataHandler

    check_positive_int(n_genes, "n_genes", none_ok=True)
    genes, ranked = DataHandler(adata, mod).ranked(n_genes)
    return [genes[row[row >= 0]].tolist() for row in ranked]


def cell_type_prediction_prompts(
    adata: AnnData | MuData,
    *,
    n_genes: int | None = 200,
    organism: Organism = "Homo sapiens",
    upper: bool = True,
    mod: str | None = None,
) -> list[str]:
    """Cell-type prediction prompts for every cell of `adata`, from :func:`sc_c2s.pp.to_sentences` results.

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)
    >>> prompts = sc_c2s.prompts.cell_type_prediction_prompts(adata, n_genes=3)
    >>> prompts[0].splitlines()[1]
    'Cell sentence: FTL CD74 HLA-DPA1.'
    """
    words = sentence_words(adata, n_genes=n_genes, mod=mod)
    if n_genes is None:
        return [cell_type_prediction(cell, organism=organism, upper=upper) for cell in words]
    return [cell_type_prediction(cell, n_genes=n_genes, organism=organism, upper=upper) for cell in words]
