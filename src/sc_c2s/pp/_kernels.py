"""Numba kernels that rank genes per cell.

The kernels know nothing of AnnData: they take CSR arrays or dense rows and fill preallocated outputs.
Ranking keeps the expressed (non-zero) entries of a row, best first. Equal values are ordered by a
64-bit key hashed from ``(seed, cell, gene)``, which is a seeded random permutation that depends on
nothing else, so CSR, CSC and dense storage of the same matrix give the same order.

Top-k selection uses a bounded heap (``O(nnz log k)``), so a short sentence never sorts a whole row.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Row status codes written by the ranking kernels.
OK, NEGATIVE, NAN = 0, 1, 2

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, inline="always")
def _mix(x):
    """Finaliser of SplitMix64: a bijective scramble of a 64-bit integer."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, inline="always")
def tie_key(seed, cell, gene):
    """Tie-break key of ``gene`` in ``cell``: higher keys rank first among equal values."""
    return _mix(_mix(np.uint64(seed) + np.uint64(cell) * _GOLDEN) ^ np.uint64(gene))


@njit(cache=True, inline="always")
def _worse(va, ga, vb, gb, seed, cell):
    """Whether entry ``a`` ranks below entry ``b`` in ``cell``."""
    if va != vb:
        return va < vb
    return tie_key(seed, cell, ga) < tie_key(seed, cell, gb)


@njit(cache=True)
def _sift_down(heap_v, heap_g, size, seed, cell):
    pos = 0
    v, g = heap_v[0], heap_g[0]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        right = child + 1
        if right < size and _worse(heap_v[right], heap_g[right], heap_v[child], heap_g[child], seed, cell):
            child = right
        if not _worse(heap_v[child], heap_g[child], v, g, seed, cell):
            break
        heap_v[pos], heap_g[pos] = heap_v[child], heap_g[child]
        pos = child
    heap_v[pos], heap_g[pos] = v, g


@njit(cache=True)
def _rank_entries(values, genes, k, seed, cell, heap_v, heap_g, out_genes, out_values):
    """Rank the entries of one cell into ``out_genes`` (best first); return ``(n_expressed, status)``.

    The heap keeps the ``k`` best entries seen so far with the worst at its root.
    """
    size = 0
    n_expressed = 0
    for t in range(values.shape[0]):
        v = values[t]
        if v != v:
            return n_expressed, NAN
        if v < 0:
            return n_expressed, NEGATIVE
        if v == 0:
            continue
        n_expressed += 1
        g = genes[t]
        if size < k:
            pos = size
            size += 1
            while pos > 0:
                parent = (pos - 1) // 2
                if not _worse(v, g, heap_v[parent], heap_g[parent], seed, cell):
                    break
                heap_v[pos], heap_g[pos] = heap_v[parent], heap_g[parent]
                pos = parent
            heap_v[pos], heap_g[pos] = v, g
        elif size > 0 and _worse(heap_v[0], heap_g[0], v, g, seed, cell):
            heap_v[0], heap_g[0] = v, g
            _sift_down(heap_v, heap_g, size, seed, cell)
    want_values = out_values.shape[0] > 0
    for j in range(size - 1, -1, -1):
        out_genes[j] = heap_g[0]
        if want_values:
            out_values[j] = heap_v[0]
        heap_v[0], heap_g[0] = heap_v[j], heap_g[j]
        _sift_down(heap_v, heap_g, j, seed, cell)
    return n_expressed, OK


@njit(parallel=True, cache=True)
def rank_csr(indptr, indices, data, cells, k, seed, n_chunks, out_genes, out_values, n_expressed, status):
    """Rank every row of a CSR matrix.

    Parameters
    ----------
    indptr, indices, data
        The CSR arrays (indices need not be sorted).
    cells
        Cell id of each row, used for the tie-break key.
    k
        Number of genes to keep per row; ``out_genes.shape[1]`` must be ``>= k``.
    seed
        Seed of the tie-break permutation.
    n_chunks
        Number of row chunks processed in parallel (each allocates its own heap).
    out_genes
        ``(n_rows, width)`` int32, prefilled with ``-1``; receives gene indices, best first.
    out_values
        ``(n_rows, width)`` array receiving the values in the same order, or a ``(0, width)`` array to skip.
    n_expressed, status
        Per-row outputs: number of expressed genes and :data:`OK`, :data:`NEGATIVE` or :data:`NAN`.
    """
    n_rows = indptr.shape[0] - 1
    chunk = (n_rows + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        heap_v = np.empty(k, dtype=data.dtype)
        heap_g = np.empty(k, dtype=np.int32)
        no_values = np.empty(0, dtype=out_values.dtype)
        for i in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            start, stop = indptr[i], indptr[i + 1]
            row_values = out_values[i] if out_values.shape[0] > 0 else no_values
            n_expressed[i], status[i] = _rank_entries(
                data[start:stop], indices[start:stop], k, seed, cells[i], heap_v, heap_g, out_genes[i], row_values
            )


@njit(parallel=True, cache=True)
def rank_dense(X, cells, k, seed, n_chunks, out_genes, out_values, n_expressed, status):
    """Rank every row of a dense matrix; arguments as in :func:`rank_csr`."""
    n_rows, n_cols = X.shape
    chunk = (n_rows + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        heap_v = np.empty(k, dtype=X.dtype)
        heap_g = np.empty(k, dtype=np.int32)
        row_v = np.empty(n_cols, dtype=X.dtype)
        row_g = np.empty(n_cols, dtype=np.int32)
        no_values = np.empty(0, dtype=out_values.dtype)
        for i in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            n = 0
            for j in range(n_cols):
                v = X[i, j]
                if v != 0:
                    row_v[n] = v
                    row_g[n] = j
                    n += 1
            row_values = out_values[i] if out_values.shape[0] > 0 else no_values
            n_expressed[i], status[i] = _rank_entries(
                row_v[:n], row_g[:n], k, seed, cells[i], heap_v, heap_g, out_genes[i], row_values
            )


@njit(cache=True)
def count_nonzero_dense(X):
    """Largest number of non-zero entries in a row of a dense matrix."""
    best = 0
    for i in range(X.shape[0]):
        n = 0
        for j in range(X.shape[1]):
            if X[i, j] != 0:
                n += 1
        best = max(best, n)
    return best


@njit(cache=True)
def csc_rows_to_csr(indptr, indices, data, cursor, stop):
    """Extract rows ``[row_start, stop)`` of a CSC matrix with sorted indices as CSR arrays.

    ``cursor[j]`` points at the first entry of column ``j`` not yet extracted and is advanced past the
    block, so consecutive blocks cost ``O(nnz + n_cols)`` each and the matrix is never converted whole.
    Row indices of the result are relative to the block start, which the caller subtracts.
    """
    n_cols = indptr.shape[0] - 1
    ends = np.empty(n_cols, dtype=np.int64)
    nnz = 0
    for j in range(n_cols):
        p = cursor[j]
        end = indptr[j + 1]
        while p < end and indices[p] < stop:
            p += 1
        ends[j] = p
        nnz += p - cursor[j]
    rows = np.empty(nnz, dtype=np.int64)
    cols = np.empty(nnz, dtype=np.int32)
    vals = np.empty(nnz, dtype=data.dtype)
    n = 0
    for j in range(n_cols):
        for p in range(cursor[j], ends[j]):
            rows[n] = indices[p]
            cols[n] = j
            vals[n] = data[p]
            n += 1
        cursor[j] = ends[j]
    return rows, cols, vals


@njit(parallel=True, cache=True)
def sentence_lengths(gene_idx, word_lengths):
    """Count the bytes of each row's sentence (words joined by single spaces)."""
    n_rows, width = gene_idx.shape
    lengths = np.zeros(n_rows, dtype=np.int64)
    for i in prange(n_rows):
        total = 0
        n = 0
        for j in range(width):
            g = gene_idx[i, j]
            if g < 0:
                break
            total += word_lengths[g]
            n += 1
        lengths[i] = total + max(n - 1, 0)
    return lengths


@njit(parallel=True, cache=True)
def write_sentences(gene_idx, word_bytes, word_offsets, row_offsets, separator, out):
    """Write each row's sentence into ``out`` at ``row_offsets[i]``, each followed by ``separator``."""
    n_rows, width = gene_idx.shape
    for i in prange(n_rows):
        pos = row_offsets[i]
        for j in range(width):
            g = gene_idx[i, j]
            if g < 0:
                break
            if j > 0:
                out[pos] = 32
                pos += 1
            for b in range(word_offsets[g], word_offsets[g + 1]):
                out[pos] = word_bytes[b]
                pos += 1
        out[pos] = separator
