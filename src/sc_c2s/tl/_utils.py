"""What the verbs that prompt a model with cells share: the genes of each cell as the model spells them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from scanpy import logging as logg

from sc_c2s import prompts
from sc_c2s._utils._validate import check_positive_int

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

    from sc_c2s.models import C2SModel

#: Share of sentence genes outside the model's vocabulary above which the gene names probably do not match.
_UNKNOWN_WARNING = 0.5


def cell_words(adata: AnnData | MuData, c2s: C2SModel, *, n_genes: int, mod: str | None) -> list[list[str]]:
    """Return the genes of each cell's sentence, best first, cased as the model expects.

    Raises the error of :meth:`~sc_c2s._data.DataHandler.c2s` when :func:`sc_c2s.pp.to_sentences` has not run, and
    warns when most genes are outside the model's vocabulary.
    """
    words = prompts.sentence_words(adata, n_genes=check_positive_int(n_genes, "n_genes"), mod=mod)
    case = str.upper if c2s.metadata.upper_case else str
    words = [[case(w) for w in cell] for cell in words]
    if c2s.metadata.vocabulary is not None:
        known = {case(w) for w in c2s.metadata.vocabulary}
        n_words = sum(map(len, words))
        share = sum(w not in known for cell in words for w in cell) / max(n_words, 1)
        if share > _UNKNOWN_WARNING:
            logg.warning(
                f"{share:.0%} of the sentence genes are not in the vocabulary of {c2s.name!r}: do the sentences use "
                "the gene names it was trained on (e.g. symbols, not Ensembl IDs; see `gene_symbols=` of "
                "`sc_c2s.pp.to_sentences`)?"
            )
    return words


def prediction_prompts(words: Sequence[Sequence[str]], *, n_genes: int, organism: str) -> list[str]:
    """Build the cell-type prediction prompts of cells whose (already cased) sentence genes are `words`.

    The prompts ask about `n_genes` genes, the number requested, whatever the length of each sentence.
    """
    return [prompts.cell_type_prediction(cell, n_genes=n_genes, organism=organism, upper=False) for cell in words]
