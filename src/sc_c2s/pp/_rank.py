"""Rank genes per cell over any matrix AnnData can hold, in row blocks, through the numba kernels."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from anndata.abc import CSCDataset, CSRDataset
from scipy import sparse

from sc_c2s._utils._numba import numba_threads

from . import _kernels

#: Dtypes the kernels are compiled for; others are converted block by block.
_KERNEL_DTYPES = (np.float32, np.float64, np.int32, np.int64)
#: Target size of one row block of a dense or CSC matrix.
_BLOCK_BYTES = 64 * 2**20
#: What to do about data that is not expression, when the caller has nothing more specific to say.
NOT_EXPRESSION_FIX = "Rank raw counts or normalised expression instead."


class NotExpressionError(ValueError):
    """The matrix holds negative, NaN or infinite values, so it is not expression (counts or normalised)."""


@dataclass
class Ranking:
    """Genes of each cell, best first."""

    genes: np.ndarray
    """``(n_cells, width)`` int32 column indices, ``-1`` padding: ``width`` is ``min(n_genes, n_genes of X)``, or
    the longest row's number of expressed genes for ``n_genes=None``."""
    values: np.ndarray | None
    """The matching values (float64), when asked for."""
    n_expressed: np.ndarray
    """Number of expressed genes per cell (also those beyond ``width``)."""


def as_kernel_dtype(a: np.ndarray) -> np.ndarray:
    """Return `a`, or a copy numba's kernels are compiled for.

    That is float64 where they take no values of its dtype (int8, longdouble, …), and its dtype in the native byte
    order where it is big-endian (as HDF5 files written by other tools can hold, and anndata reads them).
    """
    if a.dtype.type not in _KERNEL_DTYPES:
        return a.astype(np.float64)
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def canonical(block: sparse.csr_matrix) -> sparse.csr_matrix:
    """Return a CSR block with each gene at most once per row.

    Duplicate entries (valid in scipy, e.g. from COO without ``sum_duplicates``) are summed on a copy, as
    :meth:`~scipy.sparse.csr_matrix.toarray` sums them.
    """
    if block.has_canonical_format:
        return block
    with numba_threads() as n_threads:
        n_chunks = max(1, min(block.shape[0], n_threads))
        if not _kernels.has_duplicates(block.indptr, block.indices, block.shape[1], n_chunks):
            return block
    block = block.copy()
    block.sum_duplicates()
    return block


def _block_rows(n_cols: int, bytes_per_entry: float) -> int:
    return max(1, int(_BLOCK_BYTES // max(1.0, n_cols * bytes_per_entry)))


def _row_blocks(X, *, summed: bool = False) -> Iterator[tuple[int, object]]:
    """Yield ``(start, block)`` with each block a CSR matrix or a C-contiguous dense array.

    In-memory CSR and C-contiguous dense matrices are one block, used as they are (a CSR matrix that holds a gene
    twice in a row is summed on a copy, unless `summed` says it holds none). CSC matrices are cut into row blocks
    without converting the whole matrix; backed and other matrices are read block by block.
    """
    n_rows, n_cols = X.shape
    if isinstance(X, np.ndarray) and X.flags.c_contiguous:
        yield 0, X
    elif isinstance(X, np.ndarray):
        step = _block_rows(n_cols, X.itemsize)
        for start in range(0, n_rows, step):
            yield start, np.ascontiguousarray(X[start : start + step])
    elif sparse.issparse(X) and X.format == "csr":
        yield 0, X if summed else canonical(X)
    elif sparse.issparse(X) and X.format == "csc":
        X = X if X.has_sorted_indices else X.sorted_indices()
        step = _block_rows(n_cols, X.nnz / max(n_rows, 1) / max(n_cols, 1) * 24)
        cursor = X.indptr[:-1].astype(np.int64)
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            rows, cols, vals = _kernels.csc_rows_to_csr(X.indptr, X.indices, X.data, cursor, stop)
            yield start, sparse.csr_matrix((vals, (rows - start, cols)), shape=(stop - start, n_cols))
    elif sparse.issparse(X):
        yield 0, X.tocsr()
    elif isinstance(X, CSRDataset | CSCDataset) or hasattr(X, "dtype") and hasattr(X, "__getitem__"):
        step = 10_000 if isinstance(X, CSRDataset | CSCDataset) else _block_rows(n_cols, X.dtype.itemsize)
        for start in range(0, n_rows, step):
            block = X[start : start + step]
            yield start, canonical(block.tocsr()) if sparse.issparse(block) else np.ascontiguousarray(block)
    else:
        msg = (
            f"Cannot rank genes in a matrix of type {type(X).__name__}; use a numpy array, a scipy sparse matrix, "
            "a backed AnnData or a dask array."
        )
        raise TypeError(msg)


def _max_expressed(X) -> int:
    """Bound the number of expressed genes in a row from above, without densifying."""
    if sparse.issparse(X) and X.format == "csr":
        return int(np.diff(X.indptr).max(initial=0))
    if sparse.issparse(X) and X.format == "csc":
        return int(np.bincount(X.indices, minlength=X.shape[0]).max(initial=0))
    best = 0
    for _, block in _row_blocks(X):
        if sparse.issparse(block):
            best = max(best, int(np.diff(block.indptr).max(initial=0)))
        else:
            best = max(best, int(_kernels.count_nonzero_dense(as_kernel_dtype(block))))
    return best


def rank_genes(
    X,
    *,
    n_genes: int | None,
    random_state: int,
    cells: np.ndarray | None = None,
    with_values: bool = False,
    source: str = "X",
    fix: str = NOT_EXPRESSION_FIX,
    summed: bool = False,
) -> Ranking:
    """Rank the expressed genes of every row of ``X``, best first.

    Parameters
    ----------
    X
        Cells × genes: dense, any scipy sparse format, or a backed AnnData matrix.
    n_genes
        Keep at most this many genes per cell; ``None`` keeps all expressed genes.
    random_state
        Seed of the tie-break permutation.
    cells
        Id of each row for the tie-break key (default: the row number).
    with_values
        Also return the ranked values.
    source
        Name of the matrix in error messages.
    fix
        What the user can do about a matrix that is not expression (the end of the error message).
    summed
        Whether an in-memory CSR ``X`` is known to hold each gene at most once per row (from :func:`canonical`),
        which saves checking it again.

    Raises
    ------
    NotExpressionError
        If ``X`` holds negative, NaN or infinite values.
    """
    n_rows, n_cols = X.shape
    width = min(n_genes, n_cols) if n_genes is not None else _max_expressed(X)
    cells = np.arange(n_rows, dtype=np.int64) if cells is None else np.asarray(cells, dtype=np.int64)
    genes = np.empty((n_rows, width), dtype=np.int32)  # the kernels write -1 after each row's genes
    values = np.zeros((n_rows if with_values else 0, width), dtype=np.float64)
    n_expressed = np.zeros(n_rows, dtype=np.int32)
    status = np.zeros(n_rows, dtype=np.int8)
    seed = np.uint64(np.int64(random_state) & np.int64(0x7FFFFFFFFFFFFFFF))
    with numba_threads() as n_threads:
        for start, block in _row_blocks(X, summed=summed):
            stop = start + block.shape[0]
            if stop == start:
                continue
            n_chunks = min(stop - start, 8 * n_threads)
            block_values = values[start:stop] if with_values else values
            args = (cells[start:stop], width, seed, n_chunks, genes[start:stop], block_values)
            outs = (n_expressed[start:stop], status[start:stop])
            if sparse.issparse(block):
                data = as_kernel_dtype(np.asarray(block.data))
                _kernels.rank_csr(np.asarray(block.indptr), np.asarray(block.indices), data, *args, *outs)
            else:
                _kernels.rank_dense(as_kernel_dtype(np.asarray(block)), *args, *outs)
            raise_if_not_expression(status[start:stop], cells[start:stop], source, fix)
    longest = int(n_expressed.max(initial=0))
    if n_genes is None and longest < width:
        genes = np.ascontiguousarray(genes[:, :longest])
        values = np.ascontiguousarray(values[:, :longest])
    return Ranking(genes, values if with_values else None, n_expressed)


def raise_if_not_expression(status: np.ndarray, cells: np.ndarray, source: str, fix: str) -> None:
    """Raise :class:`NotExpressionError` naming the first cell whose kernel status is not :data:`~._kernels.OK`.

    The message names `source`, says what is wrong and ends with `fix`.
    """
    bad = np.flatnonzero(status != _kernels.OK)
    if bad.size == 0:
        return
    code = status[bad[0]]
    what = {_kernels.NAN: "NaN", _kernels.INFINITE: "infinite values"}.get(code, "negative values")
    why = {
        _kernels.NAN: (
            "NaN usually comes from 0/0, e.g. normalising a cell that expresses nothing; drop such cells with "
            "`sc.pp.filter_cells(adata, min_genes=1)` before normalising"
        ),
        _kernels.INFINITE: "check how it was computed (a division by zero?)",
    }.get(code, "it looks scaled or corrected")
    msg = f"`{source}` holds {what} (first in cell {cells[bad[0]]}), so it is not expression data: {why}. {fix}"
    raise NotExpressionError(msg)
