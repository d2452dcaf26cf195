from __future__ import annotations

import warnings
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse

from sc_c2s import _dask, _keys, _rank_model
from sc_c2s._data import DataHandler, Matrix, check_writable, prepare
from sc_c2s._docs import doc_adata, doc_mod, doc_params, doc_seed
from sc_c2s._utils._numba import numba_threads
from sc_c2s._utils._validate import (
    AnyRandom,
    check_flag,
    check_name,
    check_obs_column,
    check_positive_int,
    check_random_state,
    is_positive_int,
)

from . import _kernels
from ._rank import canonical, rank_genes

#: Most bytes of sentence text held at once besides the strings themselves.
_BUFFER_BYTES = 64 * 2**20

#: R² of the rank → expression fit below which `to_sentences` warns; the test data's four datasets fit at 0.84 to 0.96
#: as counts, 0.77 to 0.97 log-normalised.
WEAK_FIT = 0.5
#: Median total per cell below which a weak fit is put down to the scale of the values.
SMALL_TOTAL = 100

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData


@doc_params(doc_adata=doc_adata, doc_mod=doc_mod, doc_seed=doc_seed)
def to_sentences(
    adata: AnnData | MuData,
    *,
    n_genes: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    mod: str | None = None,
    sentences: bool | None = None,
    rank_fit: bool | int = True,
    random_state: AnyRandom = 0,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Turn each cell into a cell sentence: its expressed genes ordered by descending expression.

    Genes with expression above zero are ranked per cell; stored zeros are never ranked. Ranking is the same on
    counts and on normalised or log-normalised data, since both transformations keep the order within a cell.
    Equal values are ordered by a random permutation seeded by `random_state` that depends only on the seed,
    the cell's position (row) in the data and the gene's position (column), so CSR, CSC and dense storage give
    identical sentences, but a subset or a reordered object can order tied genes differently.

    Ranking runs in parallel numba kernels on :attr:`scanpy.settings.n_jobs` threads (``-1``: all cores),
    without densifying sparse data. Backed AnnData objects are read in row blocks. A dask array (dense or scipy
    sparse chunks, e.g. from :func:`anndata.experimental.read_elem_lazy`) is ranked lazily, chunk by chunk, on
    the active Dask client if there is one: ``obsm["c2s_genes"]`` becomes a dask array with the values of the
    in-memory result, computed when it is used (an error in the values surfaces then). Only the rank fit is computed
    at once, from the chunks that hold its sampled cells (most chunks of a large atlas; see :doc:`/scaling`). A
    sparse matrix that stores a gene twice for a cell (valid in scipy, e.g. built from COO without
    ``sum_duplicates``) is read as the sum of its entries, as :meth:`~scipy.sparse.csr_matrix.toarray` reads it,
    on a copy.

    Parameters
    ----------
    {doc_adata}
    n_genes
        Keep at most this many genes per cell (the published checkpoints read 200). ``None`` keeps every
        expressed gene.
    layer
        Rank this layer instead of ``X``.
    use_raw
        Rank :attr:`~anndata.AnnData.raw`. ``None`` means raw if present and no `layer` is given.
    gene_symbols
        Column of ``var`` (of ``raw.var`` when ranking ``.raw``) whose values are the words of the sentence (e.g.
        ``"gene_symbol"`` when ``var_names`` are Ensembl IDs). ``None`` uses ``var_names``. Names that are not
        strings (e.g. integers) become their strings, as in an h5ad file.
    {doc_mod}
    sentences
        Also store the sentences as strings in ``obs["c2s_sentence"]``; ``False`` for very large data, where
        ``obsm["c2s_genes"]`` holds the same information compactly. ``None`` means ``True`` for in-memory and
        backed data and ``False`` for a dask array (``True`` computes the ranking there, to write the strings,
        and keeps the computed gene indices in this session).
    rank_fit
        Fit the rank → expression model used to turn generated sentences back into expression, on up to
        2,000 sampled cells (an integer sets the number of cells); ``False`` skips it.
    random_state
        Seed of the tie-break permutation and of the cells sampled for the rank fit {doc_seed}. The seed used is
        recorded in ``uns["c2s"]["params"]``.
    copy
        Return a copy instead of writing into `adata`.

    Returns
    -------
    ``None``, or a copy of `adata` if ``copy=True``, with

    ``obsm["c2s_genes"]``
        int32 array of cells × positions: indices into ``uns["c2s"]["genes"]``, best first, ``-1`` padding. It has
        ``min(n_genes, n_vars)`` columns even when no cell expresses that many genes, or with ``n_genes=None`` as
        many as the longest sentence. Data ranked apart over the same genes with the same `n_genes` thus joins with
        ``anndata.concat(parts, uns_merge="same")``, which keeps of ``uns["c2s"]`` what all parts share: parts
        ranked over other genes lose ``"genes"``, and the verbs ask to rank the joined data again. With
        ``uns_merge="first"`` every cell would read its indices into the first part's genes, which only
        ``obs["c2s_sentence"]`` shows to be wrong.
    ``obs["c2s_sentence"]``
        The sentences: gene names joined by single spaces (if ``sentences=True``; otherwise the column of an earlier
        run is removed, so that it cannot disagree with ``obsm["c2s_genes"]``).
    ``uns["c2s"]``
        ``"params"`` (the arguments that make the sentences, as applied, leaving out those that are ``None``:
        ``use_raw`` and ``sentences`` as decided, the modality of a MuData as ``mod``, the seed used), the
        ``"genes"`` the indices point into, and ``"rank_fit"``: slope, intercept, R², Pearson r, Spearman ρ and the
        sample size of the fit (if `rank_fit`; without it, there is no ``"rank_fit"`` entry).

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)  # ranks `adata.raw`, log-normalised expression
    >>> adata.obs["c2s_sentence"].iloc[0].split()[:3]
    ['FTL', 'CD74', 'HLA-DPA1']
    """
    start = logg.info("ranking genes per cell")
    n_genes = check_positive_int(n_genes, "n_genes", none_ok=True)
    if n_genes is not None and n_genes > np.iinfo(np.int64).max:
        msg = (
            f"`n_genes` must be below 2**63 to be recorded in `uns['c2s']['params']` (h5ad stores it as int64), got "
            f"{n_genes}; pass `n_genes=None` to keep every expressed gene."
        )
        raise ValueError(msg)
    random_state = check_random_state(random_state)
    if isinstance(rank_fit, bool | np.bool_):
        rank_fit = bool(rank_fit)
    elif not is_positive_int(rank_fit):
        msg = f"`rank_fit` must be True, False or a positive number of cells to fit on, got {rank_fit!r}."
        raise ValueError(msg)
    use_raw = check_flag(use_raw, "use_raw", none_ok=True)
    if sentences is not None and not isinstance(sentences, bool | np.bool_):
        msg = f"`sentences` must be True, False or None (strings unless the matrix is a dask array), got {sentences!r}."
        raise ValueError(msg)
    check_writable(adata, copy=copy)
    data = DataHandler(adata, mod)
    matrix = data.matrix(layer=layer, use_raw=use_raw)
    logg.info(f"    using `{matrix.source}`: {matrix.X.shape[1]} genes")
    if 0 in matrix.X.shape:
        msg = f"`{matrix.source}` is empty ({matrix.X.shape[0]} cells × {matrix.X.shape[1]} genes): nothing to rank."
        raise ValueError(msg)
    if matrix.X.dtype.kind == "b":
        logg.warning(
            f"`{matrix.source}` holds booleans (expressed or not): a cell's expressed genes all tie, so its sentence "
            "is in the seeded order of the tie-break, not of expression; rank counts or normalised values instead."
        )
    words = gene_words(matrix, gene_symbols)
    lazy = _dask.is_dask_array(matrix.X)
    sentences = not lazy if sentences is None else sentences
    where = {"source": matrix.source, "fix": not_expression_fix(data.adata, matrix.source)}
    X, summed = matrix.X, False
    if sparse.issparse(X) and X.format == "csr":
        X, summed = canonical(X), True  # duplicate entries summed once, for the ranking and the fit
    if lazy:
        genes = _dask.rank_lazily(X, n_genes=n_genes, random_state=random_state, **where)
    else:
        ranking = rank_genes(X, n_genes=n_genes, random_state=random_state, summed=summed, **where)
        genes = ranking.genes
        n_empty = int(np.sum(ranking.n_expressed == 0))
        if n_empty:
            logg.warning(f"{n_empty} cells express no gene; their sentences are empty")
    fit = None
    if rank_fit is not False:
        n_cells = _rank_model.DEFAULT_N_CELLS if rank_fit is True else int(rank_fit)
        fit = _rank_model.fit(
            X, n_cells=n_cells, random_state=random_state, log1p_base=matrix.log1p_base, summed=summed, **where
        )
        if fit.r2 < WEAK_FIT:
            cause = (
                f"its cells sum to a median of {fit.target_sum:.3g}, a scale (proportions, values per volume) on which "
                "log10(1 + x) is nearly a line"
                if fit.target_sum < SMALL_TOTAL
                else "most cells' expressed values are equal (binarised data?)"
            )
            logg.warning(
                f"The rank fit explains little of the expression (R^2 {fit.r2:.2f}, slope {fit.slope:.3g}): {cause}. "
                "`sc_c2s.tl.from_sentences` and generated cells will read sentences back poorly; rank raw counts "
                "(`layer=`, `use_raw=`), or values normalised with `sc.pp.normalize_total(adata, target_sum=1e4)`."
            )

    params = {
        "n_genes": n_genes,
        "layer": layer,
        "use_raw": matrix.source == "raw.X",
        "gene_symbols": gene_symbols,
        "mod": data.mod,
        "sentences": bool(sentences),
        "random_state": random_state,
    }
    uns = {"params": {k: v for k, v in params.items() if v is not None}, "genes": words}
    if fit is not None:
        uns["rank_fit"] = fit.to_dict()
    results = {("obsm", _keys.GENES): genes}
    if sentences:
        if lazy:  # computed once, for the strings and obsm
            genes, results[("obsm", _keys.GENES)] = _dask.held_here(genes)
        results[("obs", _keys.SENTENCE)] = join_sentences(np.asarray(genes), words)
    results[("uns", _keys.C2S)] = uns

    adata = prepare(adata, copy=copy)
    handler = DataHandler(adata, mod)
    if not sentences:
        handler.remove("obs", _keys.SENTENCE, why="the sentences of an earlier run, with `sentences=False`")
    handler.save_all(results, start=start)
    return adata if copy else None


def not_expression_fix(adata: AnnData, source: str) -> str:
    """Return what to do about a `source` that is not expression: the other matrices of `adata` and their arguments.

    Only matrices that exist are named, so the advice never asks for an argument that cannot work.
    """
    others = ["`.raw` (`use_raw=True`)"] if source != "raw.X" and adata.raw is not None else []
    if source != "X" and adata.X is not None:
        others.append("`X` (`use_raw=False` without `layer=`)")
    others += [f"`layers[{name!r}]` (`layer={name!r}`)" for name in adata.layers if f"layers[{name!r}]" != source]
    if not others:
        return "The data holds no other matrix: store raw counts or normalised expression in a layer and pass `layer=`."
    return f"Rank raw counts or normalised expression instead, if the data holds them: {' or '.join(others)}."


def gene_words(matrix: Matrix, gene_symbols: str | None) -> np.ndarray:
    """Return the word of each gene, checked: no missing, duplicated, empty or space-holding names.

    The checks run on a :class:`pandas.Index`, which keeps the answers about missing and duplicated names, so
    ranking the same data again does not check its ``var_names`` again.
    """
    raw = matrix.source == "raw.X"
    var = "raw.var" if raw else "var"
    if gene_symbols is None:
        names, where = matrix.var_names, "raw.var_names" if raw else "var_names"
    elif raw and check_name(gene_symbols, "gene_symbols", what="column of raw.var") not in matrix.var.columns:
        msg = (
            f"`gene_symbols={gene_symbols!r}` is not a column of raw.var, which names the genes of `.raw`, the matrix "
            f"ranked; columns: {list(matrix.var.columns)}. Pass `use_raw=False` to rank `X` and read `var`, or copy "
            "the column, naming the genes that only `.raw` holds by their var_names: "
            f"`adata.raw.var[{gene_symbols!r}] = adata.var[{gene_symbols!r}].astype(object)"
            ".reindex(adata.raw.var_names).fillna(adata.raw.var_names.to_series())`."
        )
        raise KeyError(msg)
    else:
        names = pd.Index(check_obs_column(matrix.var, gene_symbols, arg="gene_symbols", where=var))
        where = f"{var}[{gene_symbols!r}]"
    if names.hasnans:
        msg = f"{where} has {int(names.isna().sum())} missing names; fill them (e.g. with the var_names) first."
        raise ValueError(msg)
    if gene_symbols is not None or names.inferred_type != "string":
        names = names.astype(str)  # as anndata writes var_names that are not strings (e.g. integers) to h5ad
    if not names.is_unique:
        duplicated = names[names.duplicated()].unique()
        if gene_symbols is not None:
            column = f"adata.{var}[{gene_symbols!r}]"
            fix = f"{column} = anndata.utils.make_index_unique({column}.astype(str))"
        elif raw:  # `.raw` has no var_names_make_unique
            fix = "adata.raw.var.index = anndata.utils.make_index_unique(adata.raw.var_names)"
        else:
            fix = "adata.var_names_make_unique()"
        msg = (
            f"{len(duplicated)} gene names in {where} occur more than once (e.g. {', '.join(duplicated[:5])}); "
            f"a sentence needs one word per gene. Make them unique with `{fix}`, or sum duplicated genes first."
        )
        raise ValueError(msg)
    words = names.to_numpy(dtype=object)
    # checks over all names at once, on a list (faster to go through than an object array); pandas looks for the
    # offending names only when there are some
    word_list = words.tolist()
    joined = "".join(word_list)
    if not all(word_list) or joined.split() != [joined]:  # an empty name, or whitespace in one
        bad = names[~names.str.fullmatch(r"\S+")]
        msg = f"{len(bad)} gene names in {where} are empty or contain whitespace (e.g. {bad[0]!r}); rename them."
        raise ValueError(msg)
    upper = "\n".join(word_list).upper().split("\n")  # no name holds a newline: checked above
    if len(set(upper)) < len(upper):
        collide = names[pd.Index(upper).duplicated(keep=False)]
        warnings.warn(
            f"{len(collide)} gene names in {where} differ only by case (e.g. {', '.join(collide[:4])}); they become "
            "the same word for the published checkpoints, which read upper-cased genes.",
            UserWarning,
            stacklevel=3,
        )
    return words


def join_sentences(genes: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Return the sentences for rows of gene indices (``-1`` ends a row): words joined by single spaces.

    The bytes of the sentences are written in parallel into a buffer of at most about 64 MB, a block of rows at a
    time, then each row is decoded into a string.
    """
    words = words.tolist()  # str.join and map iterate a list many times faster than an object array
    joined = "".join(words)
    word_bytes = joined.encode()
    word_lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    if len(word_bytes) != len(joined):  # names beyond ASCII: bytes, not characters
        word_lengths = np.fromiter((len(w.encode()) for w in words), dtype=np.int64, count=len(words))
    longest = int(word_lengths.max(initial=0))
    width = 16 * (longest // 16 + 1)
    word_lengths = word_lengths.astype(np.min_scalar_type(longest))  # small enough to stay in the fastest cache
    word_table = _kernels.word_table(np.frombuffer(word_bytes, dtype=np.uint8), word_lengths, width)
    sentences = np.empty(len(genes), dtype=object)
    with numba_threads():
        ends = np.cumsum(_kernels.sentence_lengths(genes, word_lengths))
        start = 0
        while start < len(genes):
            first_byte = ends[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, first_byte + _BUFFER_BYTES, side="right")))
            offsets = np.concatenate([[0], ends[start:stop] - first_byte])
            buffer = np.empty(offsets[-1], dtype=np.uint8)
            _kernels.write_sentences(genes[start:stop], word_table, word_lengths, offsets, buffer)
            view = memoryview(buffer)
            sentences[start:stop] = [str(view[a:b], "utf-8") for a, b in pairwise(offsets.tolist())]
            start = stop
    return sentences
