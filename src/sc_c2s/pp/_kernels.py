"""Numba kernels that rank genes per cell.

The kernels know nothing of AnnData: they take CSR arrays or dense rows and fill preallocated outputs.
Ranking keeps the expressed (non-zero) entries of a row, best first. Equal values are ordered by a
64-bit key hashed from ``(seed, cell, gene)``, which is a seeded random permutation that depends on
nothing else, so CSR, CSC and dense storage of the same matrix give the same order.

Each expressed entry becomes one 64-bit sort key: a code of its value (its float32 bits, order-preserving for
values ``>= 0``, without the low bits all packed values of the row share, counted from the smallest), then as many
top bits of its tie-break key as fill a whole number of radix digits, then its position in the row. For the top
``k`` of a longer row, a histogram of the values' leading bits finds the bin of the ``k``-th best value, only
entries from that bin up are packed, and a quickselect keeps ``k`` of them (``O(nnz)``); the ``k`` kept are
radix-sorted on the bits that differ among them, so a short sentence never sorts a whole row. Entries whose packed
keys agree on value and tie-key bits are put in order by their full tie-break keys, so the result is exact. Rows
holding a value that is not exactly a float32 (e.g. float64 log-normalised data) take a bounded-heap path
(``O(nnz log k)``) that compares values and full keys directly.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Row status codes written by the ranking kernels (``INEXACT`` only internally: a value that is not a float32).
OK, NEGATIVE, NAN, INEXACT, INFINITE = 0, 1, 2, 3, 4

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: Values are binned by the leading 12 bits of their float32 pattern (sign, exponent, 3 mantissa bits).
_BIN_SHIFT = 20
N_BINS = 2**12
#: :func:`top_runs` bins by the leading 16 bits (7 mantissa bits: integers below 256 each have their own bin).
_FINE_SHIFT = 16
N_FINE_BINS = 2**16
#: :func:`top_runs` counts integers below this in a histogram of their own.
_EXACT_BELOW = 256.0
#: Largest float32 bit pattern of a finite positive value: ``bits - 1 < _VALID`` (unsigned) for exactly those.
_VALID = np.uint32(0x7F7FFFFF)
#: ``(lowest, highest, ones, zeros)`` of no float32 bit patterns at all (:func:`_widen` adds one).
_EMPTY_BITS_RANGE = (_VALID, np.uint32(0), np.uint32(0), np.uint32(0))
#: :func:`_radix_sort` sorts arrays of at least ``_WIDE_FROM`` entries ``_WIDE_DIGIT`` bits at a time, shorter ones 8.
_WIDE_FROM = 1024
_WIDE_DIGIT = 11
_RADIX_BUCKETS = 2**_WIDE_DIGIT
#: :func:`_count_values` counts a row's distinct values in a table of ``2**_TABLE_BITS`` slots; a row with more
#: than :data:`_MAX_DISTINCT` of them is ordered through histograms instead.
_TABLE_BITS = 11
_TABLE_SIZE = 2**_TABLE_BITS
_MAX_DISTINCT = _TABLE_SIZE // 2
#: Bits of an empty slot of that table (those of a NaN: a row holding NaN is refused).
_NO_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)


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
    """Rank the entries of one cell into ``out_genes`` (best first, then ``-1``); return ``(n_expressed, status)``.

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
        if v == np.inf:
            return n_expressed, INFINITE
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
    out_genes[size:] = -1
    return n_expressed, OK


@njit(cache=True)
def _select_smallest(a, hi, k):
    """Rearrange ``a[:hi]`` so that ``a[:k]`` holds its ``k`` smallest values, in any order (quickselect)."""
    lo = 0
    while hi - lo > 16:
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi - 1]
        pivot = max(min(x, y), min(max(x, y), z))  # median of three
        i, j = lo, hi - 1
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        # now a[lo:i] <= pivot <= a[j + 1:hi]
        if k <= j + 1:
            hi = j + 1
        elif k >= i:
            lo = i
        else:
            return
    for x in range(lo + 1, hi):  # insertion sort of the last small range
        v = a[x]
        y = x - 1
        while y >= lo and a[y] > v:
            a[y + 1] = a[y]
            y -= 1
        a[y + 1] = v


@njit(cache=True)
def _radix_sort(a, low_bit, spare, counts):
    """Sort ``a`` in place by its bits from ``low_bit`` up, least significant digit first.

    Only bits that differ between the entries are sorted on: digits start at the lowest such bit and skip runs of
    constant bits, :data:`_WIDE_DIGIT` bits wide for :data:`_WIDE_FROM` entries or more (fewer passes over the
    array), else 8 bits (fewer buckets to clear and sum). The order of values that differ only below ``low_bit`` is
    unspecified. ``spare`` is as long as ``a``, ``counts`` is ``(8, _RADIX_BUCKETS)``.
    """
    n = a.shape[0]
    if n < 2:
        return
    ones = np.uint64(0)
    zeros = np.uint64(0)
    for i in range(n):
        ones |= a[i]
        zeros |= ~a[i]
    varying = ((ones & zeros) >> np.uint64(low_bit)) << np.uint64(low_bit)  # bits set in some entries only
    digit = _WIDE_DIGIT if n >= _WIDE_FROM else 8
    mask = np.uint64((1 << digit) - 1)
    shifts = np.empty(8, dtype=np.uint64)
    n_digits = 0
    bit = low_bit
    while bit < 64 and varying >> np.uint64(bit):
        if (varying >> np.uint64(bit)) & np.uint64(1):
            shifts[n_digits] = bit
            n_digits += 1
            bit += digit
        else:
            bit += 1
    n_buckets = 1 << digit
    counts[:n_digits, :n_buckets] = 0
    for i in range(n):
        x = a[i]
        for d in range(n_digits):
            counts[d, (x >> shifts[d]) & mask] += 1
    src, dst = a, spare[:n]
    for d in range(n_digits):
        c = counts[d]
        total = 0
        for b in range(n_buckets):
            total, c[b] = total + c[b], total
        for i in range(n):
            x = src[i]
            b = (x >> shifts[d]) & mask
            dst[c[b]] = x
            c[b] += 1
        src, dst = dst, src
    if n_digits % 2:
        a[:] = src


@njit(cache=True)
def _order_by_key(positions, start, stop, genes, seed, cell):
    """Insertion-sort ``positions[start:stop]`` (entries of equal value) by descending tie-break key."""
    for x in range(start + 1, stop):
        p = positions[x]
        key = tie_key(seed, cell, genes[p])
        y = x - 1
        while y >= start and tie_key(seed, cell, genes[positions[y]]) < key:
            positions[y + 1] = positions[y]
            y -= 1
        positions[y + 1] = p


@njit(cache=True, inline="always")
def _bit_length(x):
    """Return the number of bits of the unsigned integer ``x`` (``0`` for ``0``)."""
    n = 0
    while x >> np.uint64(n):
        n += 1
    return n


@njit(cache=True, inline="always")
def _widen(bits_range, bits):
    """Return ``bits_range``, ``(lowest, highest, ones, zeros)`` of some float32 bit patterns, with ``bits`` added."""
    lowest, highest, ones, zeros = bits_range
    return min(lowest, bits), max(highest, bits), ones | bits, zeros | ~bits


@njit(cache=True)
def _bits_range(values, positions, n_above, spare, n_edge):
    """Return ``(lowest, highest, ones, zeros)`` of the float32 bits of the entries to pack.

    The entries are ``values[positions[:n_above]]`` and ``values[spare[:n_edge]]``; ``ones`` and ``zeros`` gather
    the bits set and clear in each, so ``ones & zeros`` are the bits that differ between them.
    """
    bits_range = _EMPTY_BITS_RANGE
    for x in range(n_above + n_edge):
        bits_range = _widen(
            bits_range, _float32_bits(values[positions[x]] if x < n_above else values[spare[x - n_above]])
        )
    return bits_range


@njit(cache=True)
def _key_layout(bits_range, m, n_entries):
    """Return the layout of the packed keys of one row: ``(base, value_shift, tie_shift, code_shift, pos_bits)``.

    ``bits_range`` holds ``(lowest, highest, ones, zeros)`` of the float32 bits of the values to pack: they agree
    on all bits but those of ``ones & zeros``, so ``(bits >> value_shift) - base`` codes their values from 0 in the
    same order, in as few bits as the values need. The top bits of the tie-break key fill the bits above the
    position up to a whole number of radix digits, at least as many bits as ``m`` has (so that even if all ``m``
    values are equal, at most about ``m / 2`` pairs of them share their tie bits, to be ordered by their full
    keys); the value code sits above them. The radix sort of ``m`` keys then makes as few passes as the values
    allow.
    """
    lowest, highest, ones, zeros = bits_range
    varying = ones & zeros
    value_shift = np.uint64(0)
    while varying and not (varying >> value_shift) & np.uint32(1):
        value_shift += np.uint64(1)
    base = np.uint64(lowest) >> value_shift
    value_bits = _bit_length((np.uint64(highest) >> value_shift) - base)
    pos_bits = _bit_length(np.uint64(max(1, n_entries - 1)))
    digit = _WIDE_DIGIT if m >= _WIDE_FROM else 8
    sort_bits = digit * -(-(value_bits + _bit_length(np.uint64(m))) // digit)
    tie_bits = min(sort_bits, 64 - pos_bits) - value_bits
    return base, value_shift, np.uint64(64 - tie_bits), np.uint64(tie_bits + pos_bits), np.uint64(pos_bits)


@njit(cache=True, inline="always")
def _pack(values, genes, t, seed, cell, layout):
    """Return the packed key of entry ``t``: value code, tie-key bits, position, as :func:`_key_layout` lays them.

    The key is inverted, so ascending is best first.
    """
    base, value_shift, tie_shift, code_shift, pos_bits = layout
    code = (np.uint64(_float32_bits(values[t])) >> value_shift) - base
    key = tie_key(seed, cell, genes[t]) >> tie_shift
    return ~((code << code_shift) | (key << pos_bits) | np.uint64(t))


@njit(cache=True)
def _rank_packed(values, genes, k, seed, cell, histogram, packed, spare, counts, positions, out_genes, out_values):
    """Rank the entries of one cell through packed 64-bit keys; return ``(n_expressed, status)``.

    When the row has more than ``k`` entries, a histogram of the values' leading bits finds the bin holding the
    ``k``-th best value: entries of higher bins are all kept, those of that bin compete for the last places, and
    the rest are never packed. ``histogram`` (zeros, :data:`N_BINS` long) is left zeroed; ``packed``, ``spare`` and
    ``positions`` are scratch arrays at least as long as the row, ``counts`` one of ``(8, _RADIX_BUCKETS)`` for the
    radix sort. Returns status :data:`INEXACT`, with nothing written, if a value is not exactly a float32.
    """
    n_entries = values.shape[0]
    select = k < n_entries
    n = 0
    low, high = N_BINS, 0
    bits_range = _EMPTY_BITS_RANGE
    for t in range(n_entries):
        v = values[t]
        bits = _float32_bits(v)
        if (bits - np.uint32(1) >= _VALID) | (np.float32(v) != v):  # not a positive finite float32: rare
            if v == 0:
                continue
            for b in range(low, high + 1):
                histogram[b] = 0
            return n, NAN if v != v else NEGATIVE if v < 0 else INFINITE if v == np.inf else INEXACT
        n += 1
        if select:
            b = np.int64(bits >> np.uint32(_BIN_SHIFT))
            histogram[b] += 1
            low, high = min(low, b), max(high, b)
        else:  # all values are packed
            bits_range = _widen(bits_range, bits)
    floor = -1  # entries of higher bins are kept; those of this bin compete for the last places
    if select and n > k:
        above, floor = 0, high
        while above + histogram[floor] < k:
            above += histogram[floor]
            floor -= 1
    for b in range(low, high + 1):
        histogram[b] = 0

    n_above = 0
    n_edge = 0
    for t in range(n_entries):  # without branches: both slots are written, one count moves
        v = values[t]
        b = np.int64(np.float32(v).view(np.uint32) >> np.uint32(_BIN_SHIFT)) if v != 0 else np.int64(-2)
        positions[n_above] = t
        n_above += b > floor
        spare[n_edge] = t
        n_edge += b == floor
    m = min(k, n_above + n_edge)
    if m == 0:
        out_genes[:] = -1
        return n, OK
    if select:  # the values of some entries only are packed
        bits_range = _bits_range(values, positions, n_above, spare, n_edge)
    layout = _key_layout(bits_range, m, n_entries)
    pos_bits = layout[4]
    pos_mask = (np.uint64(1) << pos_bits) - np.uint64(1)
    for x in range(n_above):
        packed[x] = _pack(values, genes, positions[x], seed, cell, layout)
    for x in range(n_edge):
        packed[n_above + x] = _pack(values, genes, spare[x], seed, cell, layout)
    wanted = m - n_above  # places left for the entries of the floor bin
    if 0 < wanted < n_edge:
        edge = packed[n_above : n_above + n_edge]
        _select_smallest(edge, n_edge, wanted)
        worst_in = edge[0]
        for x in range(1, wanted):
            worst_in = max(worst_in, edge[x])
        best_out = edge[wanted]
        for x in range(wanted + 1, n_edge):
            best_out = min(best_out, edge[x])
        group = worst_in >> pos_bits
        if best_out >> pos_bits == group:
            # equal value and tie-key bits across the cut: choose the members that enter by their full keys
            n_group = 0
            for x in range(n_edge):
                if edge[x] >> pos_bits == group:
                    positions[n_group] = x
                    n_group += 1
            members = np.empty(n_group, dtype=np.int64)
            for x in range(n_group):
                members[x] = np.int64(~edge[positions[x]] & pos_mask)
            _order_by_key(members, 0, n_group, genes, seed, cell)
            slot = 0
            for x in range(n_group):
                if positions[x] < wanted:
                    edge[positions[x]] = (group << pos_bits) | (~np.uint64(members[slot]) & pos_mask)
                    slot += 1
    selected = packed[:m]
    _radix_sort(selected, int(pos_bits), spare, counts)  # positions only break ties, settled below
    for j in range(m):
        positions[j] = np.int64(~selected[j] & pos_mask)
    start = 0
    for j in range(1, m + 1):  # runs of equal value and tie-key bits: order by the full keys
        if j == m or selected[j] >> pos_bits != selected[start] >> pos_bits:
            if j - start > 1:
                _order_by_key(positions, start, j, genes, seed, cell)
            start = j
    want_values = out_values.shape[0] > 0
    for j in range(m):
        p = positions[j]
        out_genes[j] = genes[p]
        if want_values:
            out_values[j] = values[p]
    out_genes[m:] = -1
    return n, OK


@njit(cache=True)
def _rank_row(
    values, genes, k, seed, cell, heap_v, heap_g, histogram, packed, spare, counts, positions, out_genes, out_values
):
    """Rank one cell: packed keys when every value is a float32, else the bounded heap."""
    n_expressed, status = _rank_packed(
        values, genes, k, seed, cell, histogram, packed, spare, counts, positions, out_genes, out_values
    )
    if status == INEXACT:
        return _rank_entries(values, genes, k, seed, cell, heap_v, heap_g, out_genes, out_values)
    return n_expressed, status


@njit(cache=True, inline="always")
def _longest_row(indptr, first, last):
    """Most stored entries of any of the CSR rows ``first … last - 1`` (their scratch arrays' length)."""
    longest = 0
    for i in range(first, last):
        longest = max(longest, indptr[i + 1] - indptr[i])
    return longest


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
        Number of row chunks processed in parallel (each allocates its own scratch arrays).
    out_genes
        ``(n_rows, width)`` int32 receiving gene indices, best first, then ``-1`` (rows of a status other than
        :data:`OK` are left undefined).
    out_values
        ``(n_rows, width)`` array receiving the values in the same order, or a ``(0, width)`` array to skip.
    n_expressed, status
        Per-row outputs: number of expressed genes and :data:`OK`, :data:`NEGATIVE`, :data:`NAN` or
        :data:`INFINITE`.
    """
    n_rows = indptr.shape[0] - 1
    chunk = (n_rows + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        first, last = c * chunk, min(n_rows, (c + 1) * chunk)
        longest = _longest_row(indptr, first, last)
        heap_v = np.empty(k, dtype=data.dtype)
        heap_g = np.empty(k, dtype=np.int32)
        histogram = np.zeros(N_BINS, dtype=np.int64)
        packed = np.empty(longest, dtype=np.uint64)
        spare = np.empty(longest, dtype=np.uint64)
        counts = np.empty((8, _RADIX_BUCKETS), dtype=np.int64)
        positions = np.empty(longest, dtype=np.int64)
        no_values = np.empty(0, dtype=out_values.dtype)
        for i in range(first, last):
            start, stop = indptr[i], indptr[i + 1]
            row_values = out_values[i] if out_values.shape[0] > 0 else no_values
            n_expressed[i], status[i] = _rank_row(
                data[start:stop],
                indices[start:stop],
                k,
                seed,
                cells[i],
                heap_v,
                heap_g,
                histogram,
                packed,
                spare,
                counts,
                positions,
                out_genes[i],
                row_values,
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
        histogram = np.zeros(N_BINS, dtype=np.int64)
        packed = np.empty(n_cols, dtype=np.uint64)
        spare = np.empty(n_cols, dtype=np.uint64)
        counts = np.empty((8, _RADIX_BUCKETS), dtype=np.int64)
        positions = np.empty(n_cols, dtype=np.int64)
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
            n_expressed[i], status[i] = _rank_row(
                row_v[:n],
                row_g[:n],
                k,
                seed,
                cells[i],
                heap_v,
                heap_g,
                histogram,
                packed,
                spare,
                counts,
                positions,
                out_genes[i],
                row_values,
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


@njit(parallel=True, cache=True)
def has_duplicates(indptr, indices, n_cols, n_chunks):
    """Whether a row of a CSR matrix holds the same column twice (indices need not be sorted).

    Row chunks are checked in parallel, each marking the columns it meets with the row that met them last.
    """
    n_rows = indptr.shape[0] - 1
    chunk = (n_rows + n_chunks - 1) // n_chunks
    found = np.zeros(n_chunks, dtype=np.bool_)
    for c in prange(n_chunks):
        last_row = np.full(n_cols, -1, dtype=np.int64)
        seen_twice = False
        for i in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                seen_twice |= last_row[j] == i
                last_row[j] = i
            if seen_twice:
                break
        found[c] = seen_twice
    return found.any()


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


@njit(cache=True)
def word_table(word_bytes, word_lengths, width):
    """Return a table whose row ``g`` holds the bytes of word ``g`` and a space, zero-padded to ``width``.

    ``word_bytes`` holds the words one after the other, ``word_lengths`` their lengths in bytes.
    """
    table = np.zeros((word_lengths.shape[0], width), dtype=np.uint8)
    start = 0
    for g in range(word_lengths.shape[0]):
        stop = start + word_lengths[g]
        table[g, : stop - start] = word_bytes[start:stop]
        table[g, stop - start] = ord(" ")
        start = stop
    return table


@njit(parallel=True, cache=True)
def write_sentences(gene_idx, word_table, word_lengths, row_offsets, out):
    """Write row ``i``'s sentence into ``out[row_offsets[i]:row_offsets[i + 1]]``.

    Row ``g`` of ``word_table`` holds word ``g`` followed by a space, padded with zeros to the table's width (at
    least 16). A word whose bytes and space fit in 8 or 16 bytes is copied as that whole block of its table row
    while the block fits inside the sentence (a fixed-length copy, one move; the next word overwrites the padding),
    other words and the last ones of a sentence byte-exactly, so no thread writes into another row's sentence.
    Offsets are unsigned: indexing them needs no check for negative indices, which would keep the copies byte by
    byte.
    """
    n_rows, width = gene_idx.shape
    table = word_table.reshape(-1)
    table_width = np.uint64(word_table.shape[1])
    for i in prange(n_rows):
        pos = np.uint64(row_offsets[i])
        end = np.uint64(row_offsets[i + 1])
        for j in range(width):
            g = gene_idx[i, j]
            if g < 0:
                break
            n = np.uint64(word_lengths[g]) + np.uint64(1)
            src = np.uint64(g) * table_width
            if n <= np.uint64(8) and pos + np.uint64(8) <= end:
                for b in range(8):
                    out[pos + np.uint64(b)] = table[src + np.uint64(b)]
            elif n <= np.uint64(16) and pos + np.uint64(16) <= end:
                for b in range(16):
                    out[pos + np.uint64(b)] = table[src + np.uint64(b)]
            else:
                for b in range(min(n, end - pos)):
                    out[pos + np.uint64(b)] = table[src + np.uint64(b)]
            pos += n


@njit(cache=True)
def _sort_descending(a, start, stop):
    """Sort ``a[start:stop]`` descending: insertion sort for a short or all-equal range, else numba's sort."""
    if stop - start > 32:
        low, high = a[start], a[start]
        for x in range(start + 1, stop):
            low, high = min(low, a[x]), max(high, a[x])
        if low != high:
            a[start:stop] = -np.sort(-a[start:stop])
        return
    for x in range(start + 1, stop):
        v = a[x]
        y = x - 1
        while y >= start and a[y] < v:
            a[y + 1] = a[y]
            y -= 1
        a[y + 1] = v


@njit(cache=True, inline="always")
def _float32_bits(v):
    """Bits of ``v`` as a float32, ordered as the values for ``v >= 0``.

    ``bits - 1 < _VALID`` (unsigned) iff ``v`` is a positive finite float32; other values need a closer look.
    """
    return np.float32(v).view(np.uint32)


@njit(cache=True)
def _top_values(values, m, histogram, high, offsets, scratch, out):
    """Write the ``m`` largest non-zero ``values`` of one row into ``out``, descending, given their histogram.

    ``histogram`` counts the expressed values by their leading :data:`_FINE_SHIFT` bits as a float32, up to bin
    ``high``. Walking down from ``high`` finds the floor bin that holds the ``m``-th largest value; one
    pass without branches gathers the values from that bin up, those of higher bins are placed bin by bin (a
    counting sort), the largest of the floor bin are chosen by a quickselect, and each bin's values are sorted.
    ``offsets`` is as long as ``histogram``, ``scratch`` at least as long as the row.
    """
    shift = np.uint32(_FINE_SHIFT)
    filled, floor = 0, np.int64(high)
    while True:  # bins from the top: where each one's values go in `out`
        offsets[floor] = filled
        if filled + histogram[floor] >= m:
            break
        filled += histogram[floor]
        floor -= 1
    first_bits = np.uint32(floor) << shift  # the smallest float32 pattern of the floor bin (> 0: zeros are out)
    n_candidates = 0
    for t in range(values.shape[0]):
        v = np.float64(values[t])  # unsigned integers too can be negated
        scratch[n_candidates] = v
        n_candidates += (_float32_bits(v) >= first_bits) & (v != 0)
    n_floor = 0
    for x in range(n_candidates):
        v = scratch[x]
        b = _float32_bits(v) >> shift
        if b > floor:
            out[offsets[b]] = v
            offsets[b] += 1
        else:
            scratch[n_floor] = -v  # negated: the quickselect keeps the smallest
            n_floor += 1
    wanted = m - filled  # places left for the values of the floor bin
    if wanted < n_floor:
        _select_smallest(scratch, n_floor, wanted)
    for x in range(wanted):
        out[filled + x] = -scratch[x]
    start = 0
    for b in range(np.int64(high), floor - 1, -1):
        stop = start + histogram[b] if b > floor else m
        _sort_descending(out, start, stop)
        start = stop


@njit(cache=True)
def _fine_histogram(values, histogram):
    """Count the expressed ``values`` (none negative) by their leading :data:`_FINE_SHIFT` bits as a float32.

    Returns ``(n_expressed, low, high)``: the number of non-zero values and the lowest and highest bins counted.
    """
    n = 0
    low, high = np.uint32(N_FINE_BINS), np.uint32(0)
    shift = np.uint32(_FINE_SHIFT)
    for t in range(values.shape[0]):
        v = np.float64(values[t])
        if v != 0:
            n += 1
            b = _float32_bits(v) >> shift
            histogram[b] += 1
            low, high = min(low, b), max(high, b)
    return n, low, high


@njit(cache=True)
def _first_invalid(values):
    """Return the status of the first value that is NaN, negative or infinite; :data:`OK` if there is none."""
    for t in range(values.shape[0]):
        v = values[t]
        if v != v:
            return NAN
        if v < 0:
            return NEGATIVE
        if v == np.inf:
            return INFINITE
    return OK


@njit(cache=True)
def _add_run(v, count, run_values, run_counts, n_runs):
    """Append ``count`` values ``v`` to the runs (descending values); return the new number of runs."""
    if n_runs > 0 and run_values[n_runs - 1] == v:
        run_counts[n_runs - 1] += count
        return n_runs
    run_values[n_runs] = v
    run_counts[n_runs] = count
    return n_runs + 1


@njit(cache=True, fastmath={"reassoc"})
def _sum_and_check(values):
    """Return ``(total, negative, integers)`` of one row: its sum, and whether some value is negative, all integers.

    Reassociating the sum lets it vectorise; the order of a sum of integers does not change it. NaN keeps its
    meaning: it makes the total NaN, and it is not an integer.
    """
    total = 0.0
    negative = False
    integers = True
    for t in range(values.shape[0]):
        v = np.float64(values[t])  # unsigned integers too can be negated
        total += v
        negative |= v < 0
        integers &= v == np.floor(v)
    return total, negative, integers


@njit(cache=True)
def _count_values(values, log_scale, table):
    """Count the distinct positive values of one row; with ``log_scale > 0``, also sum ``expm1(log_scale * v)``.

    A row of counts, log-transformed or normalised, holds few distinct values (one per count): they are keyed by
    their bits in ``table``, each one's ``expm1`` computed once. ``table`` is ``(keys, counts, values, expm1s,
    used)``: arrays of :data:`_TABLE_SIZE` slots, empty (all keys :data:`_NO_BITS`), and the list of the slots
    taken (:data:`_MAX_DISTINCT` long). Returns ``(n_distinct, total, invalid)``: the number of distinct values,
    or ``-1`` (and ``table`` empty) if there are more than :data:`_MAX_DISTINCT`, the rest of the row then being
    summed only; the sum of the positive values, in the order of the row (``0`` for ``log_scale == 0``); and
    whether some value is negative or NaN.
    """
    keys, counts, values_of, transformed, used = table
    total = 0.0
    invalid = False
    n_distinct = 0
    mask = np.uint64(_TABLE_SIZE - 1)
    for t in range(values.shape[0]):
        v = np.float64(values[t])
        if not v > 0:  # zero, negative or NaN
            invalid |= v != 0
            continue
        if n_distinct < 0:
            if log_scale > 0:
                total += np.expm1(log_scale * v)
            continue
        bits = v.view(np.uint64)
        slot = (bits * _GOLDEN) >> np.uint64(64 - _TABLE_BITS)
        while keys[slot] != bits and keys[slot] != _NO_BITS:
            slot = (slot + np.uint64(1)) & mask
        if keys[slot] != bits:
            if n_distinct == _MAX_DISTINCT:
                _clear_table(table, n_distinct)
                n_distinct = -1
                if log_scale > 0:
                    total += np.expm1(log_scale * v)
                continue
            keys[slot] = bits
            counts[slot] = 0
            values_of[slot] = v
            transformed[slot] = np.expm1(log_scale * v) if log_scale > 0 else 0.0
            used[n_distinct] = slot
            n_distinct += 1
        counts[slot] += 1
        total += transformed[slot]
    return n_distinct, total, invalid


@njit(cache=True)
def _clear_table(table, n_distinct):
    """Empty the ``n_distinct`` slots of ``table`` that :func:`_count_values` took."""
    keys, _, _, _, used = table
    for x in range(n_distinct):
        keys[used[x]] = _NO_BITS


@njit(cache=True)
def _table_runs(table, n_distinct, k, scratch, run_values, run_counts):
    """Write the runs of the ``k`` largest values counted in ``table`` and empty it; return ``(n, n_runs)``.

    ``n`` is the number of values counted; ``scratch`` is at least ``n_distinct`` long.
    """
    _, counts, values_of, _, used = table
    n = 0
    for x in range(n_distinct):
        scratch[x] = -values_of[used[x]]  # negated: ascending is best first
        n += counts[used[x]]
    order = np.argsort(scratch[:n_distinct])
    left = min(n, k)
    n_runs = 0
    for x in range(n_distinct):
        if left == 0:
            break
        slot = used[order[x]]
        count = min(left, counts[slot])
        n_runs = _add_run(values_of[slot], count, run_values, run_counts, n_runs)
        left -= count
    _clear_table(table, n_distinct)
    return n, n_runs


@njit(cache=True)
def _top_runs_row(
    values,
    k,
    log_scale,
    small,
    table,
    histogram,
    offsets,
    scratch,
    sorted_values,
    run_values,
    run_counts,
):
    """Find the runs of equal values among the ``k`` largest non-zero ``values`` of one row, and its total.

    Returns ``(n_expressed, n_runs, total, status)``; the runs go into ``run_values`` (descending) and
    ``run_counts``. A row of integers (counts) is counted in ``small``, each value below :data:`_EXACT_BELOW` in a
    bin of its own, and its few larger values are gathered: the runs are read from ``small`` once those are
    sorted. Other rows are counted by distinct value in ``table`` (:func:`_count_values`), or, with more than
    :data:`_MAX_DISTINCT` of them, ordered by :func:`_top_values`. ``small`` (:data:`_EXACT_BELOW` long),
    ``table`` and ``histogram`` (:data:`N_FINE_BINS` long) are empty, left empty; ``offsets`` is as long as
    ``histogram``, ``scratch`` at least as long as the row, ``sorted_values`` at least ``k`` long.
    """
    n_distinct = 0
    if log_scale > 0:
        n_distinct, total, invalid = _count_values(values, log_scale, table)
        integers = False
    else:
        total, invalid, integers = _sum_and_check(values)
    if invalid or not total < np.inf:  # NaN, negative or infinite values, or a total too large
        status = _first_invalid(values)
        if status != OK:
            _clear_table(table, max(n_distinct, 0))
            return 0, 0, total, status
    n_runs = 0
    if integers:
        n_large = 0
        for t in range(values.shape[0]):
            v = np.float64(values[t])
            if v < _EXACT_BELOW:
                small[np.int64(v)] += 1
            else:
                scratch[n_large] = -v  # negated: ascending is best first
                n_large += 1
        n = values.shape[0] - small[0]
        m = min(n, k)
        if n_large > m:
            _select_smallest(scratch, n_large, m)
        n_sorted = min(n_large, m)
        scratch[:n_sorted].sort()
        for x in range(n_sorted):
            n_runs = _add_run(-scratch[x], 1, run_values, run_counts, n_runs)
        left = m - n_sorted
        j = small.shape[0] - 1
        while left > 0:
            count = min(left, small[j])
            if count > 0:
                n_runs = _add_run(np.float64(j), count, run_values, run_counts, n_runs)
                left -= count
            j -= 1
        small[:] = 0
        return n, n_runs, total, OK
    if log_scale == 0:
        n_distinct = _count_values(values, log_scale, table)[0]
    if n_distinct >= 0:
        n, n_runs = _table_runs(table, n_distinct, k, scratch, run_values, run_counts)
        return n, n_runs, total, OK
    n, low, high = _fine_histogram(values, histogram)
    m = min(n, k)
    if m > 0:
        _top_values(values, m, histogram, high, offsets, scratch, sorted_values)
        for x in range(m):
            n_runs = _add_run(sorted_values[x], 1, run_values, run_counts, n_runs)
        for b in range(low, high + 1):
            histogram[b] = 0
    return n, n_runs, total, OK


@njit(parallel=True, cache=True)
def top_runs(indptr, data, log_scale, n_chunks, run_values, run_counts, n_runs, totals, n_expressed, status):
    """Find the runs of equal values among the largest expressed values of each CSR row, and the row totals.

    Only the values, not which genes hold them, so equal values need no tie-break and only the
    ``run_values.shape[1]`` largest of a row are ordered (``O(nnz)`` besides). Row ``i`` receives its distinct
    values among those, descending, in ``run_values[i, :n_runs[i]]`` (as stored), how many of them hold each in
    ``run_counts``, the sum of all its values in ``totals`` and its number of expressed values (also those beyond
    the width) in ``n_expressed``; ``status`` as in :func:`rank_csr`. ``log_scale`` is ``ln(base)`` of a
    ``log1p`` transform to undo for the totals (``1`` for the natural log, ``0`` for none): they sum
    ``expm1(log_scale * v)`` then.
    """
    n_rows = indptr.shape[0] - 1
    k = run_values.shape[1]
    chunk = (n_rows + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        first, last = c * chunk, min(n_rows, (c + 1) * chunk)
        small = np.zeros(np.int64(_EXACT_BELOW), dtype=np.int64)
        table = (
            np.full(_TABLE_SIZE, _NO_BITS, dtype=np.uint64),
            np.empty(_TABLE_SIZE, dtype=np.int64),
            np.empty(_TABLE_SIZE),
            np.empty(_TABLE_SIZE),
            np.empty(_MAX_DISTINCT, dtype=np.uint64),
        )
        histogram = np.zeros(N_FINE_BINS, dtype=np.int64)
        offsets = np.empty(N_FINE_BINS, dtype=np.int64)
        scratch = np.empty(_longest_row(indptr, first, last), dtype=np.float64)
        sorted_values = np.empty(k, dtype=np.float64)
        for i in range(first, last):
            n_expressed[i], n_runs[i], totals[i], status[i] = _top_runs_row(
                data[indptr[i] : indptr[i + 1]],
                k,
                log_scale,
                small,
                table,
                histogram,
                offsets,
                scratch,
                sorted_values,
                run_values[i],
                run_counts[i],
            )
