from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from sc_c2s import _keys
from sc_c2s._rank_model import RankFit

from ._utils import warn_unknown

#: Columns of ``obs`` that count the words of each sentence.
COUNTS = ["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]
#: Characters stripped from both ends of a word that is no gene as it stands; those inside gene names (``-``, ``.``,
#: ``_``) stay inside.
_PUNCTUATION = ",;:.!?\"'`()[]{}<>*-–—"
#: Punctuation that closes a word in a sentence (the tokenizer conventions split it off): removed from a word that is no
#: gene as it stands.
_CLOSING = ".,:"


def from_sentences(
    sentences: Iterable[str],
    *,
    genes: Sequence[str] | pd.Index | np.ndarray,
    rank_fit: Mapping[str, Any] | RankFit,
) -> AnnData:
    """Turn cell sentences back into expression with the rank → expression model.

    Works on any text: sentences made by a C2S model, by another language model or by
    :func:`sc_c2s.pp.to_sentences`. Each sentence is split on whitespace; a word is looked up as it stands, then
    less a closing period, comma or colon (so that genes such as ``Su(H)`` or ``l(2)gl`` are found at the end of a
    sentence), else with the punctuation around it stripped; a missing sentence (``None`` or NaN) is empty.
    Sentences and gene names given as bytes (as h5py hands out strings) are decoded as UTF-8. Words are matched to
    `genes` ignoring case, so genes whose names differ only by case (e.g. ``CD4`` and ``Cd4``) are one word, which
    goes to the first of them (the others get no expression); unknown words are dropped, and a gene named twice keeps
    its first position.
    The gene at 0-based position ``p`` among the kept words gets ``intercept + slope * log10(1 + p)``, clipped at 0.

    Parameters
    ----------
    sentences
        One sentence per cell; the index of a :class:`~pandas.Series` (e.g. ``adata.obs["c2s_sentence"]``)
        becomes the ``obs_names`` of the result. A mapping is refused: pass its values, or a Series.
    genes
        Vocabulary: the genes of the result, unique, and none missing (``None`` or NaN). For sentences of
        :func:`sc_c2s.pp.to_sentences`, ``adata.uns["c2s"]["genes"]``: the names they were written with, which are
        not ``adata.var_names`` where it ran with `gene_symbols=`. A warning says when most words are not genes of
        `genes`.
    rank_fit
        The fitted model, e.g. ``adata.uns["c2s"]["rank_fit"]`` or a checkpoint's ``metadata.rank_fit``.

    Returns
    -------
    A new AnnData of sentences × `genes` whose sparse ``X`` holds reconstructed expression on the scale of the fit
    (``log10(1 + x)`` of counts normalised to the median library size), with ``obs`` columns

    ``n_valid_genes``
        Words that are genes of the vocabulary, counted once.
    ``n_unknown_words``
        Words that are not.
    ``n_duplicate_genes``
        Repeats of a gene already in the sentence.

    and ``uns["c2s_rank_fit"]``, the rank fit used, as a dict (:meth:`~sc_c2s.RankFit.to_dict`), and
    ``uns["log1p"]``, ``{"base": 10}``, which tells scanpy the scale (as :func:`scanpy.pp.log1p` records its own, so
    that e.g. the fold changes of :func:`scanpy.tl.rank_genes_groups` are right).

    Examples
    --------
    >>> import sc_c2s
    >>> fit = {"slope": -0.68, "intercept": 2.24}
    >>> cells = sc_c2s.tl.from_sentences(["CD3D cd3e, XYZ CD3D."], genes=["CD3D", "CD3E", "CD4"], rank_fit=fit)
    >>> cells.X.toarray().round(2)
    array([[2.24, 2.04, 0.  ]], dtype=float32)
    >>> cells.obs[["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]].iloc[0].tolist()
    [2, 1, 1]
    """
    cells = reconstruct(sentences, genes=genes, rank_fit=rank_fit)
    warn_unknown(
        int(cells.obs["n_unknown_words"].sum()),
        int(cells.obs[COUNTS].to_numpy().sum()),
        what="the words of the sentences are not genes of `genes`",
        fix="are the sentences written with these gene names? For sentences of `sc_c2s.pp.to_sentences`, pass "
        "`genes=adata.uns['c2s']['genes']`, the names they were written with (symbols where it ran with "
        "`gene_symbols=`), rather than `adata.var_names`.",
    )
    return cells


def reconstruct(
    sentences: Iterable[str], *, genes: Sequence[str] | pd.Index | np.ndarray, rank_fit: Mapping[str, Any] | RankFit
) -> AnnData:
    """Do what :func:`from_sentences` does without its warning about unknown words.

    For callers that report unknown words in their own terms (the scores count them as invalid words).
    """
    fit = RankFit.from_dict(rank_fit)
    genes = gene_index(genes)
    if isinstance(sentences, Mapping):
        msg = (
            "`sentences` is a mapping, whose keys are not sentences: pass its values, `list(sentences.values())`, or "
            "a Series, `pd.Series(sentences)`, whose index names the cells."
        )
        raise TypeError(msg)
    if isinstance(sentences, pd.DataFrame):
        columns = ", ".join(map(repr, sentences.columns[:3]))
        msg = (
            f"`sentences` is a DataFrame, whose iteration gives its column names ({columns}), not sentences: pass "
            'the column of sentences, e.g. `df["c2s_sentence"]`.'
        )
        raise TypeError(msg)
    if isinstance(sentences, str) or not isinstance(sentences, Iterable):
        what = "one string; wrap it in a list" if isinstance(sentences, str) else f"a {type(sentences).__name__}"
        msg = f"`sentences` must be a list of sentences, not {what}."
        raise TypeError(msg)
    X, counts = read(sentences, vocabulary(genes), fit, n_genes=len(genes))
    obs = pd.DataFrame(
        counts,
        columns=COUNTS,
        index=sentences.index.astype(str)
        if isinstance(sentences, pd.Series)
        else pd.RangeIndex(X.shape[0]).astype(str),
    )
    uns = {_keys.FROM_SENTENCES_RANK_FIT: fit.to_dict(), _keys.LOG1P: log10_record()}
    return AnnData(X, obs=obs, var=pd.DataFrame(index=genes), uns=uns)


def log10_record() -> dict[str, int]:
    """Return the `uns["log1p"]` of values on the rank fit's scale, ``log10(1 + x)``: scanpy's verbs read the base."""
    return {"base": 10}


def gene_index(genes: Sequence[str] | pd.Index | np.ndarray) -> pd.Index:
    """Return the vocabulary as an index of strings, checked: a list of unique names, none missing."""
    if isinstance(genes, str) or not pd.api.types.is_list_like(genes):
        msg = f"`genes` must be a list of gene names, got {genes!r}."
        raise TypeError(msg)
    names = np.asarray(genes, dtype=object).ravel()
    missing = np.flatnonzero(pd.isna(names))
    if missing.size:
        msg = (
            f"`genes` has {missing.size} missing names (None or NaN; the first at position {missing[0]}); a word "
            "cannot match them. Drop them or fill them in (e.g. with the var_names) first."
        )
        raise ValueError(msg)
    genes = pd.Index([_decoded(name, "A gene name") for name in names])
    if genes.has_duplicates:
        msg = f"`genes` must be unique; duplicated: {list(genes[genes.duplicated()].unique()[:5])}."
        raise ValueError(msg)
    return genes


def vocabulary(genes: pd.Index) -> dict[str, int]:
    """Map each upper-cased gene name to its column (the first, for names that differ only by case)."""
    words: dict[str, int] = {}
    for i, gene in enumerate(genes.str.upper()):
        words.setdefault(gene, i)
    return words


def read(
    sentences: Iterable[object], words: Mapping[str, int], fit: RankFit, *, n_genes: int
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Read sentences over a :func:`vocabulary` of `n_genes` columns.

    Returns the expression (CSR, float32) and, per sentence, the counts of :data:`COUNTS` (int32).
    """
    indptr, indices, counts = [0], [], []
    for sentence in sentences:
        hits = [column for column in (_column(w, words) for w in _text(sentence).upper().split()) if column is not None]
        known = [h for h in hits if h >= 0]
        kept = list(dict.fromkeys(known))
        indices.extend(kept)
        indptr.append(len(indices))
        counts.append((len(kept), len(hits) - len(known), len(known) - len(kept)))

    return _expression(indices, indptr, fit, n_genes=n_genes), np.asarray(counts, dtype=np.int32).reshape(-1, 3)


def reconstruct_ranked(
    ranked: np.ndarray, *, genes: Sequence[str] | pd.Index | np.ndarray, rank_fit: Mapping[str, Any] | RankFit
) -> sparse.csr_matrix:
    """Read sentences given as indices into `genes` (rows of ``obsm["c2s_genes"]``; ``-1``: no gene) over `genes`.

    The expression is that of :func:`reconstruct` on the same sentences written out, without writing and parsing
    them: each gene goes to the column of the first gene of its name up to case, and a row keeps the first of its
    genes that share a column.
    """
    fit, genes, ranked = RankFit.from_dict(rank_fit), gene_index(genes), np.asarray(ranked)
    words = vocabulary(genes)
    column = np.array([words[gene] for gene in genes.str.upper()], dtype=np.int64)
    if np.array_equal(column, np.arange(len(genes))):  # no two names alike up to case: each gene its own column
        keep = ranked >= 0
        indices, lengths = ranked[keep], keep.sum(axis=1)
    else:
        rows = [list(dict.fromkeys(column[row[row >= 0]].tolist())) for row in ranked]
        indices, lengths = [i for row in rows for i in row], [len(row) for row in rows]
    return _expression(indices, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), fit, n_genes=len(genes))


def _expression(indices: Sequence[int], indptr: Sequence[int], fit: RankFit, *, n_genes: int) -> sparse.csr_matrix:
    """Expression (CSR, float32) of sentences whose genes, best first, are the columns `indices` (rows: `indptr`)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    positions = np.arange(len(indices)) - np.repeat(indptr[:-1], np.diff(indptr))
    X = sparse.csr_matrix(
        (fit.predict(positions).astype(np.float32), np.asarray(indices, dtype=np.int32), indptr),
        shape=(len(indptr) - 1, n_genes),
    )
    X.eliminate_zeros()
    return X


def _column(word: str, words: Mapping[str, int]) -> int | None:
    """Column of an upper-cased word: ``-1`` for no gene, ``None`` for no word (punctuation alone).

    The word is looked up as it stands (gene names may end in punctuation: ``l(2)gl.``), then less a closing
    period, comma or colon, so that genes whose names begin or end with punctuation (Drosophila ``Su(H)``,
    ``l(2)gl``) are found at the end of a sentence; only then with punctuation stripped from both ends
    (``"(CD3D)"`` is ``CD3D``).
    """
    for candidate in (word, word[:-1] if word[-1] in _CLOSING else None):
        column = words.get(candidate, -1)
        if column >= 0:
            return column
    stripped = word.strip(_PUNCTUATION)
    return words.get(stripped, -1) if stripped else None


def _text(sentence: object) -> str:
    """Return the sentence as a string; ``None`` and NaN (e.g. a cell missing from a MuData modality) are empty."""
    return "" if pd.api.types.is_scalar(sentence) and pd.isna(sentence) else _decoded(sentence, "A sentence")


def _decoded(value: object, what: str) -> str:
    """Return `value` as a string: bytes (as h5py hands out strings) decoded as UTF-8, others by ``str``."""
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        msg = f"{what} is bytes that are not UTF-8 ({value[:40]!r}); decode it into a string first."
        raise ValueError(msg) from None
