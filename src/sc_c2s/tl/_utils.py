"""What the verbs that prompt a model with cells share.

The genes of each cell as the model spells them, draws of groups of cells, and the check of free-text answers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scanpy import logging as logg

from sc_c2s import prompts
from sc_c2s._data import DataHandler
from sc_c2s._utils._validate import check_obs_column, check_positive_int
from sc_c2s.models._metadata import PERTURBATION

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

    from sc_c2s.models import C2SModel

#: Share of words outside the genes they are read with (the model's vocabulary, the real cells' genes) above which
#: the gene names probably do not match.
UNKNOWN_WARNING = 0.5
#: What to do about cells that express no gene.
REMOVE_EMPTY = "remove such cells first, e.g. with `sc.pp.filter_cells(adata, min_genes=1)`."
#: Prompts on which the answer prefix of a checkpoint that records none is detected.
PREFIX_PROMPTS = 8
#: Cells per multi-cell prompt when the caller names none: C2S-Scale's prompts hold 5 to 20.
DEFAULT_N_CELLS = 10
#: Each task of ``metadata.tasks`` as warnings name it, and what a model not trained for it gives.
_TASKS = {
    "cell_type_prediction": ("cell-type prediction", "labels"),
    "cell_type_generation": ("cell-type conditioned generation", "cells"),
    "tissue_prediction": ("tissue prediction", "answers"),
    "tissue_generation": ("tissue-conditioned multi-cell generation", "cells"),
    "summary": ("summaries", "texts"),
    PERTURBATION: ("perturbation response", "cells"),
}


def check_task(c2s: C2SModel, task: str) -> None:
    """Warn when `c2s` was not trained for `task` (of ``metadata.tasks``) in the prompts of :mod:`sc_c2s.prompts`.

    A model trained in another prompt format (``metadata.prompt_style`` other than ``"c2s"``, e.g. the first C2S
    release's) reads these prompts as poorly as one not trained for the task.
    """
    what, results = _TASKS[task]
    style = c2s.metadata.prompt_style
    if task not in c2s.metadata.tasks:
        logg.warning(f"{c2s.name!r} was not trained for {what}; expect poor {results}.")
    elif style != "c2s":
        logg.warning(
            f"{c2s.name!r} was not trained for {what} in the prompt format of `sc_c2s.prompts` (its prompt style is "
            f"{style!r}); expect poor {results}."
        )


def model_n_genes(c2s: C2SModel, n_genes: int | None) -> int:
    """`n_genes`, or for ``None`` the genes per sentence the model was trained on (``metadata.n_genes``)."""
    return c2s.metadata.n_genes if n_genes is None else n_genes


def model_organism(c2s: C2SModel, organism: str | None) -> prompts.Organism:
    """`organism`, or for ``None`` the model's (``metadata.organism``).

    Checked by :func:`sc_c2s.prompts.check_organism`.
    """
    return prompts.check_organism(c2s.metadata.organism if organism is None else organism)


def cell_words(
    adata: AnnData | MuData, c2s: C2SModel, *, n_genes: int, mod: str | None, cells: np.ndarray | None = None
) -> list[list[str]]:
    """Return the genes of each cell's sentence, best first, cased as the model expects; of `cells` only (positions).

    Raises the error of :meth:`~sc_c2s._data.DataHandler.c2s` when :func:`sc_c2s.pp.to_sentences` has not run, and
    a :class:`ValueError` when no sentence gene is in the model's vocabulary; warns when most are outside it.
    """
    genes, ranked = DataHandler(adata, mod).ranked(check_positive_int(n_genes, "n_genes"), cells=cells)
    case = str.upper if c2s.metadata.upper_case else str
    cased = np.array([case(gene) for gene in genes], dtype=object)  # one string per gene, which all cells share
    words = [cased[row[row >= 0]].tolist() for row in ranked]
    if c2s.metadata.vocabulary is not None:
        known = {case(w) for w in c2s.metadata.vocabulary}
        used = ranked[ranked >= 0]
        is_known = np.array([word in known for word in cased], dtype=bool)
        n_unknown, n_words = int(np.count_nonzero(~is_known[used])), used.size
        names = (
            "the gene names it was trained on (e.g. symbols, not Ensembl IDs; see `gene_symbols=` of "
            "`sc_c2s.pp.to_sentences`)"
        )
        if n_words and n_unknown == n_words:
            example = cased[used[0]]
            msg = (
                f"None of the sentence genes is in the vocabulary of {c2s.name!r} (e.g. {example!r}), so its answers "
                f"would say nothing about the cells. Rank the genes under {names}."
            )
            raise ValueError(msg)
        warn_unknown(
            n_unknown,
            n_words,
            what=f"the sentence genes are not in the vocabulary of {c2s.name!r}",
            fix=f"do the sentences use {names}?",
        )
        in_sentence = ranked >= 0
        n_blind = int((in_sentence.any(axis=1) & ~(in_sentence & is_known[np.maximum(ranked, 0)]).any(axis=1)).sum())
        if n_blind:
            logg.warning(
                f"{n_blind} cells have no sentence gene in the vocabulary of {c2s.name!r}: the model reads each of "
                "them as the same unknown words, so their results are alike and say nothing about them. Are they of "
                f"another dataset, whose genes need {names}?"
            )
    return words


def warn_empty_sentences(n_empty: int, *, cells: str, results: str) -> None:
    """Warn that `n_empty` `cells` (e.g. ``"control cells"``) have empty sentences: `results` rest on nothing."""
    if n_empty:
        warnings.warn(
            f"{n_empty} {cells} have empty sentences (they express no gene), so {results} are guesses from the prompt "
            f"alone; {REMOVE_EMPTY}",
            UserWarning,
            stacklevel=3,
        )


def drawn_words(
    adata: AnnData | MuData, c2s: C2SModel, draws: Sequence[tuple[str, np.ndarray]], *, n_genes: int, mod: str | None
) -> dict[int, list[str]]:
    """Return :func:`cell_words` of the cells of `draws` (of :func:`group_draws`) by position; of no others."""
    cells = np.unique(np.concatenate([cells for _, cells in draws]))
    return dict(zip(cells.tolist(), cell_words(adata, c2s, n_genes=n_genes, mod=mod, cells=cells), strict=True))


def warn_empty_draws(
    draws: Sequence[tuple[str, np.ndarray]], words: Mapping[int, Sequence[str]], *, results: str
) -> None:
    """Warn when all the cells drawn for a prompt have empty sentences: the prompt holds no gene."""
    empty = [str(name) for name, cells in draws if not any(words[i] for i in cells)]
    if empty:
        warnings.warn(
            f"The cells drawn for {len(set(empty))} groups express no gene (e.g. {empty[0]!r}), so their {results} are "
            f"guesses from the prompt alone; {REMOVE_EMPTY}",
            UserWarning,
            stacklevel=3,
        )


def warn_unknown(n_unknown: int, n_words: int, *, what: str, fix: str) -> None:
    """Warn when more than :data:`UNKNOWN_WARNING` of `n_words` words are unknown: the gene names probably differ.

    The message is the share, `what` (``"… are not …"``) and `fix`.
    """
    share = n_unknown / max(n_words, 1)
    if share > UNKNOWN_WARNING:
        logg.warning(f"{share:.0%} of {what}: {fix}")


def prediction_prompts(words: Sequence[Sequence[str]], *, n_genes: int, organism: str) -> list[str]:
    """Build the cell-type prediction prompts of cells whose (already cased) sentence genes are `words`.

    The prompts ask about `n_genes` genes, the number requested, whatever the length of each sentence.
    """
    return [prompts.cell_type_prediction(cell, n_genes=n_genes, organism=organism, upper=False) for cell in words]


def prompt_cells(n_cells: int | None, c2s: C2SModel, *, default: int = DEFAULT_N_CELLS) -> int:
    """Return the cells per multi-cell prompt: `n_cells`, or a default for ``None``.

    The default is `default`, clipped into the range the model was trained on where its metadata records one
    (``training["n_cells"]``: fewest and most).
    """
    if n_cells is not None:
        return n_cells
    trained = c2s.metadata.training.get("n_cells")
    if trained is None:
        return default
    fewest, most = trained
    return int(min(max(default, fewest), most))


def group_draws(groups: pd.Series, *, n_cells: int, n_draws: int, random_state: int) -> list[tuple[str, np.ndarray]]:
    """Draw `n_draws` sets of `n_cells` cells of each group of `groups` (an ``obs`` column), seeded.

    Returns ``(group, positions)`` per draw, groups in the order of their categories (sorted otherwise), draws of
    a group together. A draw takes its cells without replacement, in random order; a group of fewer than
    `n_cells` cells gives all of them, shuffled. Cells without a group (missing values) are never drawn.
    """
    rng = np.random.default_rng(random_state)
    codes, names = _codes(groups)
    draws = []
    for code, name in enumerate(names):
        cells = np.flatnonzero(codes == code)
        if not len(cells):
            continue
        draws += [(name, rng.permutation(cells)[:n_cells]) for _ in range(n_draws)]
    return draws


def _codes(groups: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer code of each cell's group (``-1``: none) and the group names, as strings."""
    categorical = groups if isinstance(groups.dtype, pd.CategoricalDtype) else groups.astype("category")
    return categorical.cat.codes.to_numpy(), [str(c) for c in categorical.cat.categories]


def gene_lists(answers: Sequence[str | None], genes: Sequence[str]) -> np.ndarray:
    """Which free-text answers are lists of genes rather than labels: two words or more, most of them genes.

    Models asked for a label sometimes continue the cell sentence instead; such answers are no label. Words are
    compared with `genes` case-insensitively.
    """
    known = {g.upper() for g in genes}
    out = np.zeros(len(answers), dtype=bool)
    for i, text in enumerate(answers):
        words = (text or "").replace(",", " ").split()
        out[i] = len(words) >= 2 and sum(w.upper() in known for w in words) > len(words) / 2
    return out


def free_labels(
    answers: Sequence[str],
    genes: Sequence[str],
    *,
    vocabulary: Sequence[str] | None,
    known: Sequence[str] | None,
    what: str,
    stacklevel: int = 3,
) -> list[str | None]:
    """Return the free-text answers as labels: empty answers and lists of genes (:func:`gene_lists`) are ``None``.

    Genes are those of the data (`genes`) and of the model's `vocabulary`: on data unlike its training data, a model
    continues sentences with genes of its own. Answers the model was trained on (`known`, e.g. ``"S100A8 S100A9
    Mono"``) are labels whatever their words. Each kind dropped is counted in a warning; `what` names the labels
    asked for, and `stacklevel` counts from this function (3 points at the caller of the verb that calls it).
    """
    trained = set(known or ())
    is_genes = gene_lists(answers, [*genes, *(vocabulary or ())]) & np.array(
        [answer not in trained for answer in answers], dtype=bool
    )
    is_empty = np.array([not answer for answer in answers], dtype=bool)
    n = len(answers)
    if is_genes.any():
        warnings.warn(
            f"{int(is_genes.sum())} of {n} answers are lists of genes, not {what}; they are missing (NaN). The model "
            f"continues cell sentences instead of naming {what}: constrain it with `labels=[...]`.",
            UserWarning,
            stacklevel=stacklevel,
        )
    if is_empty.any():
        warnings.warn(
            f"{int(is_empty.sum())} of {n} answers are empty; they are missing (NaN).",
            UserWarning,
            stacklevel=stacklevel,
        )
    return [None if drop else answer for answer, drop in zip(answers, is_genes | is_empty, strict=True)]


def groups_of(handler: DataHandler, groupby: str) -> pd.Series:
    """Return the ``obs`` column `groupby`, checked: present, and at least one cell in a group."""
    groups = check_obs_column(handler.obs, groupby, arg="groupby")
    if groups.isna().all():
        msg = f"obs[{groupby!r}] is missing for every cell; pass a column that assigns cells to groups."
        raise ValueError(msg)
    return groups


def in_stable_order(names: Iterable[Any]) -> list[Any]:
    """Return `names` as a list: in their own order, or for a set in sorted order (by text).

    A set's order changes with Python's hash seed, and with it what a verb records and draws for each name.
    """
    return sorted(names, key=str) if isinstance(names, set | frozenset) else list(names)


def keep_answer_prefix(c2s: C2SModel, scores: Mapping[str, float], *, what: str, measure: str) -> str:
    """Keep the answer prefix that scored higher in the model's metadata, and log the choice.

    `scores` of ``" "`` and ``""``, the space on a tie; `what` names what follows the prompt, `measure` the score.
    """
    chosen = "" if scores[""] > scores[" "] else " "
    c2s.metadata.answer_prefix = chosen
    how = "without" if chosen == "" else "after"
    logg.info(
        f"    {c2s.name!r} records no answer prefix: {what} follow the prompt {how} a space ({measure} "
        f"{scores[' ']:.2f} with a space, {scores['']:.2f} without)"
    )
    return chosen
