"""The numba ranking kernels and their wrapper, against a plain numpy reference."""

from __future__ import annotations

import subprocess
import sys

import numba
import numpy as np
import pytest
import scanpy as sc
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import sparse

from sc_c2s._utils._numba import numba_threads
from sc_c2s.pp import _kernels, _rank, _to_sentences
from sc_c2s.pp._rank import NotExpressionError, rank_genes
from sc_c2s.pp._to_sentences import join_sentences


def reference(X: np.ndarray, seed: int, k: int | None = None, cells: np.ndarray | None = None) -> list[list[int]]:
    """Expressed genes of each row, by descending value, then by descending tie key; the first ``k``."""
    cells = np.arange(X.shape[0]) if cells is None else cells
    out = []
    for cell, row in zip(cells, np.asarray(X, dtype=np.float64), strict=True):
        genes = np.flatnonzero(row)
        keys = np.array([_kernels.tie_key(seed, int(cell), int(g)) for g in genes], dtype=np.uint64)
        order = np.lexsort((~keys, -row[genes]))  # ~key ascending = key descending
        out.append(genes[order][:k].tolist())
    return out


def as_lists(genes: np.ndarray) -> list[list[int]]:
    return [row[row >= 0].tolist() for row in genes]


def run_kernel(X: np.ndarray, k: int, seed: int, n_chunks: int, fmt: str, rng: np.random.Generator):
    """Call a kernel directly; CSR input gets shuffled indices and a few stored zeros."""
    n_rows = X.shape[0]
    genes = np.full((n_rows, k), -1, dtype=np.int32)
    values = np.zeros((n_rows, k))
    n_expressed = np.zeros(n_rows, dtype=np.int32)
    status = np.zeros(n_rows, dtype=np.int8)
    cells = np.arange(n_rows, dtype=np.int64)
    if fmt == "dense":
        _kernels.rank_dense(X, cells, k, np.uint64(seed), n_chunks, genes, values, n_expressed, status)
    else:
        coo = sparse.coo_matrix(X)
        zeros = rng.integers(0, X.shape, size=(3, 2))  # stored zeros where X is 0
        zeros = zeros[X[zeros[:, 0], zeros[:, 1]] == 0]
        zeros = np.unique(zeros, axis=0)
        row = np.concatenate([coo.row, zeros[:, 0]])
        col = np.concatenate([coo.col, zeros[:, 1]])
        data = np.concatenate([coo.data, np.zeros(len(zeros), dtype=X.dtype)])
        perm = rng.permutation(len(row))
        csr = sparse.csr_matrix((data[perm], (row[perm], col[perm])), shape=X.shape)
        csr.has_sorted_indices = False
        csr.indices, csr.data = csr.indices.copy(), csr.data.copy()
        for i in range(n_rows):  # scramble the order within each row
            s, e = csr.indptr[i], csr.indptr[i + 1]
            p = rng.permutation(e - s) + s
            csr.indices[s:e], csr.data[s:e] = csr.indices[p], csr.data[p]
        _kernels.rank_csr(
            csr.indptr, csr.indices, csr.data, cells, k, np.uint64(seed), n_chunks, genes, values, n_expressed, status
        )
    return genes, values, n_expressed, status


tie_heavy = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64]),
    shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    elements=st.sampled_from([0, 0, 0, 1, 1, 2, 3, 7]),
)


@settings(max_examples=60, deadline=None, derandomize=True)  # the same draws on every run
@given(X=tie_heavy, data=st.data(), fmt=st.sampled_from(["csr", "dense"]))
def test_kernel_matches_reference(X, data, fmt):
    k = data.draw(st.integers(1, X.shape[1]), label="k")
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
    n_chunks = data.draw(st.integers(1, X.shape[0]), label="n_chunks")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="rng"))

    genes, values, n_expressed, status = run_kernel(X, k, seed, n_chunks, fmt, rng)

    expected = reference(X, seed, k)
    assert as_lists(genes) == expected
    assert np.all(status == _kernels.OK)
    np.testing.assert_array_equal(n_expressed, (X != 0).sum(axis=1))
    for i, row in enumerate(expected):
        np.testing.assert_array_equal(values[i, : len(row)], X[i, row])
        assert np.all(values[i, len(row) :] == 0)


@settings(max_examples=40, deadline=None, derandomize=True)  # the same draws on every run
@given(
    X=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=20),
        elements=st.floats(0, 1e6, allow_subnormal=False),
    ),
    seed=st.integers(0, 2**63 - 1),
)
def test_rank_genes_matches_reference_on_continuous_values(X, seed):
    ranking = rank_genes(X, n_genes=None, random_state=seed)
    assert as_lists(ranking.genes) == reference(X, seed)
    assert ranking.genes.shape == (X.shape[0], (X != 0).sum(axis=1).max())


def numpy_tie_keys(seed: int, cell: int, genes: np.ndarray) -> np.ndarray:
    """The documented tie-break key, SplitMix64 twice, written again in numpy."""

    def mix(x):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    with np.errstate(over="ignore"):
        base = mix(np.array([seed], dtype=np.uint64) + np.uint64(cell) * np.uint64(0x9E3779B97F4A7C15))
        return mix(base ^ np.asarray(genes).astype(np.uint64))


def test_numpy_tie_keys_match_the_kernel():
    genes = np.array([0, 1, 2, 19_999, 2**31 - 1])
    for seed, cell in [(0, 0), (42, 7), (2**63 - 1, 10**9)]:
        expected = [_kernels.tie_key(seed, cell, int(g)) for g in genes]
        assert numpy_tie_keys(seed, cell, genes).tolist() == expected


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_long_tied_rows_order_by_the_full_tie_key(fmt):
    """100,000 genes of one cell at two values: the fast path packs at most 21 bits of each tie key beside the
    value (7 for the top 41), so many tied genes share them, and the full keys must decide, also across the cut of
    the top k."""
    n, seed, cell = 100_000, 9, 3
    rng = np.random.default_rng(0)
    row = np.ones(n, dtype=np.float32)
    row[rng.choice(n, 40, replace=False)] = 2
    X = np.zeros((cell + 1, n), dtype=np.float32)
    X[cell] = row
    keys = numpy_tie_keys(seed, cell, np.arange(n))
    ones = row == 1
    assert len(np.unique(keys[ones] >> np.uint64(43))) < ones.sum() - 1_000  # many shared 21-bit prefixes
    order = np.lexsort((~keys, -row))
    M = sparse.csr_matrix(X) if fmt == "csr" else X
    for k in [1, 40, 41, 777, 5_000, n - 1, None]:
        ranking = rank_genes(M, n_genes=k, random_state=seed, with_values=True)
        np.testing.assert_array_equal(ranking.genes[cell], order[:k])
        np.testing.assert_array_equal(ranking.values[cell], row[order[:k]])


@pytest.mark.parametrize("n_expressed", [1_023, 1_024, 6_000])
def test_long_rows_of_counts_and_normalised_values_match_the_reference(n_expressed):
    """Rows as long as real cells', whose values differ in many bits (counts from 1 to tens of thousands, and
    normalised float32 values): sorted 8 bits at a time below 1,024 entries and 11 bits at a time from there."""
    rng = np.random.default_rng(n_expressed)
    counts = np.zeros((4, 8_000), dtype=np.float32)
    for row in counts:
        genes = rng.choice(row.size, n_expressed, replace=False)
        row[genes] = np.minimum(rng.pareto(0.8, n_expressed).astype(np.int64) + 1, 50_000)
    normalised = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    for X in (counts, normalised):
        expected = reference(X, 5)
        for k in (200, None):
            ranking = rank_genes(sparse.csr_matrix(X), n_genes=k, random_state=5)
            assert as_lists(ranking.genes) == [row[:k] for row in expected]


@pytest.mark.parametrize("n_expressed", [300, 3_000])
def test_values_across_the_float32_range_match_the_reference(n_expressed):
    """Values from the smallest subnormal to the largest float32, with ties: a cell's value code then needs all 31
    bits of a positive float32, leaving the fewest bits for the tie-break key beside it."""
    rng = np.random.default_rng(n_expressed)
    tiny, largest = np.finfo(np.float32).smallest_subnormal, np.finfo(np.float32).max
    X = np.zeros((3, 4_000), dtype=np.float32)
    for row in X:
        genes = rng.choice(row.size, n_expressed, replace=False)
        row[genes] = np.maximum(10.0 ** rng.uniform(-45, 38, n_expressed), tiny).astype(np.float32)
        row[genes[:2]] = tiny, largest
        row[genes[2 : n_expressed // 3]] = row[genes[2]]  # a third of the row tied
    for k in (1, 200, None):
        ranking = rank_genes(sparse.csr_matrix(X), n_genes=k, random_state=3)
        assert as_lists(ranking.genes) == reference(X, 3, k)


def test_rows_with_and_without_float32_values_mix():
    """Rows with a value that is not a float32 take the heap path; the other rows of the chunk are unaffected."""
    rng = np.random.default_rng(3)
    X = rng.integers(0, 4, size=(40, 300)).astype(np.float64)
    X[::2, -1] = 0.1  # not a float32: the heap path
    X[1::4, 5] = 2**40  # an integer-valued float64 that is a float32
    expected = reference(X, 1)
    for M in [X, sparse.csr_matrix(X)]:
        for k in [3, 50, None]:
            assert as_lists(rank_genes(M, n_genes=k, random_state=1).genes) == [r[:k] for r in expected]


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_large_integers_beyond_float32(dtype):
    """2**24 + 1 is no float32: such rows are ranked exactly too."""
    X = np.array([[2**24 + 1, 2**24, 2**24 + 1, 3, 0]], dtype=dtype)
    expected = reference(X, 0)
    assert expected[0][2:] == [1, 3]
    assert as_lists(rank_genes(sparse.csr_matrix(X), n_genes=None, random_state=0).genes) == expected
    assert as_lists(rank_genes(X, n_genes=3, random_state=0).genes) == [expected[0][:3]]


def test_tie_key_is_a_pure_function_of_seed_cell_and_gene():
    key = _kernels.tie_key(42, 7, 3)
    assert key == _kernels.tie_key(42, 7, 3)
    assert 0 <= key < 2**64
    others = {_kernels.tie_key(43, 7, 3), _kernels.tie_key(42, 8, 3), _kernels.tie_key(42, 7, 4)}
    assert key not in others
    assert len(others) == 3


def test_tie_order_is_a_permutation_that_varies_with_seed_and_cell():
    """Among 50 genes with equal values, each seed and cell gives its own order of all 50."""
    X = np.ones((3, 50), dtype=np.float32)
    orders = {tuple(row) for seed in (0, 1, 2) for row in rank_genes(X, n_genes=None, random_state=seed).genes}
    assert len(orders) == 9
    assert all(sorted(order) == list(range(50)) for order in orders)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_kernel_flags_negative_and_nan_rows(fmt):
    X = np.array([[1, 2, 0], [1, -1, 0], [np.nan, 0, 1], [0, 0, 0]], dtype=np.float64)
    _, _, n_expressed, status = run_kernel(X, 3, 0, 2, fmt, np.random.default_rng(0))
    np.testing.assert_array_equal(status, [_kernels.OK, _kernels.NEGATIVE, _kernels.NAN, _kernels.OK])
    assert n_expressed[0] == 2
    assert n_expressed[3] == 0


def test_csc_rows_to_csr_extracts_consecutive_blocks():
    rng = np.random.default_rng(0)
    X = sparse.random(40, 25, density=0.2, format="csc", random_state=rng, dtype=np.float32)
    cursor = X.indptr[:-1].astype(np.int64)
    pieces = []
    for start, stop in [(0, 7), (7, 8), (8, 8), (8, 40)]:
        rows, cols, vals = _kernels.csc_rows_to_csr(X.indptr, X.indices, X.data, cursor, stop)
        assert np.all((rows >= start) & (rows < stop))
        pieces.append(sparse.coo_matrix((vals, (rows, cols)), shape=X.shape))
    np.testing.assert_array_equal(sum(pieces).toarray(), X.toarray())
    np.testing.assert_array_equal(cursor, X.indptr[1:])


def test_count_nonzero_dense():
    X = np.array([[0, 1, 2], [0, 0, 0], [3, 3, 3]], dtype=np.float32)
    assert _kernels.count_nonzero_dense(X) == 3
    assert _kernels.count_nonzero_dense(X[:2]) == 2


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 7])
def test_has_duplicates_in_any_row_and_chunk(n_chunks):
    """Unsorted rows without repeats pass; one column stored twice in any single row is found, whatever the chunks."""
    rng = np.random.default_rng(0)
    n_rows, n_cols, per_row = 20, 50, 10
    indices = np.concatenate([rng.choice(n_cols, per_row, replace=False) for _ in range(n_rows)])
    indptr = np.arange(0, n_rows * per_row + 1, per_row)
    assert not _kernels.has_duplicates(indptr, indices, n_cols, n_chunks)
    for row in (0, 9, n_rows - 1):
        repeated = indices.copy()
        repeated[row * per_row + 3] = repeated[row * per_row + 7]
        assert _kernels.has_duplicates(indptr, repeated, n_cols, n_chunks)


@pytest.mark.parametrize("buffer_bytes", [2**26, 10, 1], ids=["one_block", "small_blocks", "row_by_row"])
def test_join_sentences_handles_padding_empty_rows_and_multibyte_words(monkeypatch, buffer_bytes):
    monkeypatch.setattr(_to_sentences, "_BUFFER_BYTES", buffer_bytes)
    # a name of 36 bytes makes the kernel's word table 48 bytes wide: whole-row copies overrun short sentences
    long = "ENSG00000000003.15_TSPAN6-antisense1"
    words = np.array(["CD3D", "α-actin", "HLA-A", "IL7R", long], dtype=object)
    genes = np.array([[1, 0, 3], [2, -1, -1], [-1, -1, -1], [3, 2, 1], [4, 0, 4]], dtype=np.int32)
    assert join_sentences(genes, words).tolist() == [
        "α-actin CD3D IL7R",
        "HLA-A",
        "",
        "IL7R HLA-A α-actin",
        f"{long} CD3D {long}",
    ]
    assert join_sentences(np.zeros((0, 2), dtype=np.int32), words).tolist() == []


@pytest.mark.parametrize("longest", [255, 256, 70_000])
def test_join_sentences_writes_names_of_any_length(longest):
    """Word lengths are held in the smallest integer type that fits the longest name: one byte up to 255."""
    words = np.array(["A" * longest, "B" * (longest - 1), "C"], dtype=object)
    genes = np.array([[0, 1, 2], [2, 1, -1]], dtype=np.int32)
    assert join_sentences(genes, words).tolist() == [" ".join(words), f"C {words[1]}"]


def all_formats(X: np.ndarray) -> dict[str, object]:
    return {
        "dense": X,
        "dense_fortran": np.asfortranarray(X),
        "csr": sparse.csr_matrix(X),
        "csc": sparse.csc_matrix(X),
        "csc_unsorted": unsorted_csc(X),
        "coo": sparse.coo_matrix(X),
        "csr_array": sparse.csr_array(X),
        "csc_array": sparse.csc_array(X),
    }


def unsorted_csc(X: np.ndarray) -> sparse.csc_matrix:
    csc = sparse.csc_matrix(X)
    for j in range(csc.shape[1]):
        s, e = csc.indptr[j], csc.indptr[j + 1]
        csc.indices[s:e], csc.data[s:e] = csc.indices[s:e][::-1].copy(), csc.data[s:e][::-1].copy()
    csc.has_sorted_indices = False
    return csc


@pytest.mark.parametrize("block_bytes", [64, 2**26], ids=["one_row_blocks", "one_block"])
def test_every_format_and_block_size_gives_the_same_ranking(monkeypatch, block_bytes):
    monkeypatch.setattr(_rank, "_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(1)
    X = (rng.poisson(0.6, size=(30, 20)) * rng.integers(0, 2, size=(30, 20))).astype(np.float32)
    expected = reference(X, 5)
    for name, M in all_formats(X).items():
        ranking = rank_genes(M, n_genes=None, random_state=5)
        assert as_lists(ranking.genes) == expected, name
        np.testing.assert_array_equal(ranking.n_expressed, (X != 0).sum(axis=1))


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64])
def test_every_dtype_gives_the_same_ranking(dtype):
    X = np.array([[0, 3, 1, 3, 0, 2], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    expected = reference(X, 0)
    formats = {"dense": X.astype(dtype)} if dtype == np.float16 else all_formats(X.astype(dtype))  # no sparse float16
    for name, M in formats.items():
        assert as_lists(rank_genes(M, n_genes=None, random_state=0).genes) == expected, (name, dtype)


def test_rank_genes_width_values_and_cell_ids():
    X = np.array([[0, 5, 2, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    full = rank_genes(X, n_genes=None, random_state=0, with_values=True)
    np.testing.assert_array_equal(full.genes, [[1, 2], [0, -1], [-1, -1]])
    np.testing.assert_array_equal(full.values, [[5, 2], [1, 0], [0, 0]])
    assert full.values.dtype == np.float64
    # n_genes larger than the longest row keeps min(n_genes, n_genes of X) columns, padded; a smaller one truncates
    np.testing.assert_array_equal(
        rank_genes(X, n_genes=10, random_state=0).genes, np.pad(full.genes, ((0, 0), (0, 2)), constant_values=-1)
    )
    np.testing.assert_array_equal(rank_genes(X, n_genes=1, random_state=0).genes, [[1], [0], [-1]])
    assert rank_genes(X, n_genes=None, random_state=0).values is None
    # ids of the rows, not their positions, seed the tie-break
    ties = np.ones((2, 30))
    by_id = rank_genes(ties, n_genes=None, random_state=3, cells=np.array([10, 11]))
    assert as_lists(by_id.genes) == reference(ties, 3, cells=np.array([10, 11]))
    assert as_lists(by_id.genes) != as_lists(rank_genes(ties, n_genes=None, random_state=3).genes)


def test_rank_genes_all_empty():
    ranking = rank_genes(sparse.csr_matrix((3, 4), dtype=np.float32), n_genes=None, random_state=0)
    assert ranking.genes.shape == (3, 0)
    np.testing.assert_array_equal(ranking.n_expressed, 0)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize(("bad", "what"), [(-1.0, "negative values"), (np.nan, "NaN")])
def test_rank_genes_refuses_non_expression(fmt, bad, what):
    X = np.ones((4, 3))
    X[2, 1] = bad
    match = rf"`layers\['z'\]` holds {what} \(first in cell 2\), so it is not expression data: .*\. Rank counts\.$"
    with pytest.raises(NotExpressionError, match=match):
        rank_genes(all_formats(X)[fmt], n_genes=2, random_state=0, source="layers['z']", fix="Rank counts.")


def test_rank_genes_refuses_unknown_matrix_types():
    with pytest.raises(TypeError, match="Cannot rank genes in a matrix of type _Shaped; use .* or a dask array"):
        rank_genes(_Shaped(), n_genes=1, random_state=0)


class _Shaped:
    shape = (2, 2)


@pytest.mark.usefixtures("n_jobs")
@pytest.mark.parametrize(
    ("setting", "expected"),
    [(1, 1), (-1, numba.config.NUMBA_NUM_THREADS), (10_000, numba.config.NUMBA_NUM_THREADS)],
    ids=["one", "all", "capped"],
)
def test_threads_follow_scanpy_n_jobs(setting, expected):
    sc.settings.n_jobs = setting
    before = numba.get_num_threads()
    with numba_threads() as n:
        assert n == expected == numba.get_num_threads()
    assert numba.get_num_threads() == before


def test_torch_thread_count_survives_the_kernels():
    # in a fresh process: numba's OpenMP layer sets OpenMP's thread count when it first starts its threads
    code = (
        "import torch, scanpy as sc, sc_c2s\n"
        "torch.set_num_threads(1)\n"
        "sc.settings.n_jobs = -1\n"
        "sc_c2s.pp.to_sentences(sc.datasets.pbmc68k_reduced(), n_genes=None, rank_fit=False)\n"
        "print(torch.get_num_threads())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1"]


def test_torch_threads_are_set_only_when_the_kernels_changed_them(monkeypatch):
    """torch.set_num_threads turns MKL's dynamic threads off, which with numba's nested OpenMP slowed training 8x."""
    import torch

    with numba_threads():  # numba's threads started, as the test alone or first would not find them
        pass
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    with numba_threads():
        pass
    assert calls == []
    count = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", iter([count, count + 1]).__next__)  # as numba's first start does
    with numba_threads():
        pass
    assert calls == [count]


@pytest.mark.usefixtures("n_jobs")
def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(2)
    X = sparse.random(200, 50, density=0.3, format="csr", random_state=rng, data_rvs=lambda n: rng.integers(1, 4, n))
    sc.settings.n_jobs = 1
    one = rank_genes(X, n_genes=20, random_state=0).genes
    sc.settings.n_jobs = -1
    np.testing.assert_array_equal(one, rank_genes(X, n_genes=20, random_state=0).genes)


def top_runs(X: sparse.csr_matrix, k: int, log_scale: float = 0.0):
    """Run the kernel; return each row's top values expanded from its runs, the runs, totals, counts and status."""
    n = X.shape[0]
    run_values, run_counts = np.full((n, k), np.nan), np.zeros((n, k), dtype=np.int32)
    n_runs, totals = np.zeros(n, dtype=np.int32), np.zeros(n)
    n_expressed, status = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int8)
    _kernels.top_runs(X.indptr, X.data, log_scale, 2, run_values, run_counts, n_runs, totals, n_expressed, status)
    runs = [(run_values[i, : n_runs[i]], run_counts[i, : n_runs[i]]) for i in range(n)]
    top = [np.repeat(values, counts) for values, counts in runs]
    return top, runs, totals, n_expressed, status


def test_top_runs_by_hand():
    """Largest values first as runs of equal values, stored zeros skipped, the runs cut at k, totals of all values."""
    X = sparse.csr_matrix(
        (
            np.array([3, 0, 1, 3, 2, 0.5, 300, 2, 2, 300, 7, 2], dtype=np.float32),
            np.array([4, 0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5]),
            np.array([0, 5, 6, 6, 12]),
        ),
        shape=(4, 6),
    )
    top, runs, totals, n_expressed, status = top_runs(X, 3)
    np.testing.assert_array_equal(runs[0][0], [3, 2])  # 3, 3, 2 of 3, 0, 1, 3, 2
    np.testing.assert_array_equal(runs[0][1], [2, 1])
    np.testing.assert_array_equal(top[1], [0.5])  # not integers: counted by distinct value
    assert runs[2][0].size == 0
    np.testing.assert_array_equal(runs[3][0], [300, 7])  # values from 256 up are sorted apart
    np.testing.assert_array_equal(runs[3][1], [2, 1])
    np.testing.assert_array_equal(totals, [9, 0.5, 0, 613])
    np.testing.assert_array_equal(n_expressed, [4, 1, 0, 6])
    np.testing.assert_array_equal(status, [_kernels.OK] * 4)
    huge = sparse.csr_matrix(np.array([[1e20, 3.0, 3.0]]))  # an integer beyond int64: counted once, ranked first
    top, _, _, n_expressed, _ = top_runs(huge, 2)
    np.testing.assert_array_equal(top[0], [1e20, 3])
    np.testing.assert_array_equal(n_expressed, [3])
    _, runs, totals, _, _ = top_runs(X, 3, log_scale=np.log(2.0))  # totals undo log2(1 + x): x = 2**v - 1
    np.testing.assert_array_equal(runs[0][0], [3, 2])  # the stored values
    np.testing.assert_allclose(totals[:2], [7 + 7 + 1 + 3, np.sqrt(2) - 1], rtol=1e-15)


@pytest.mark.parametrize("kind", ["counts", "continuous", "wide counts", "log counts", "log continuous"])
def test_top_runs_match_a_full_sort(kind):
    """Against numpy's sort, with rows longer and shorter than k and values sharing and straddling histogram bins.

    Continuous rows hold up to 2,500 distinct values: the longer ones go past the table of distinct values.
    """
    rng = np.random.default_rng(0)
    n_rows, n_cols = 60, 3000
    lengths = rng.integers(0, 2500, n_rows)
    rows, cols, vals = [], [], []
    for i, n in enumerate(lengths):
        rows += [i] * n
        cols += rng.choice(n_cols, n, replace=False).tolist()
        values = {
            "counts": rng.geometric(0.2, n),
            "continuous": rng.lognormal(0, 2, n),
            "wide counts": rng.integers(1, 100_000, n),
            "log counts": np.log1p(rng.geometric(0.2, n)),
            "log continuous": np.log1p(rng.lognormal(0, 2, n)),
        }[kind]
        vals += values.tolist()
    X = sparse.csr_matrix((np.array(vals), (rows, cols)), shape=(n_rows, n_cols))
    log_scale = 1.0 if kind.startswith("log") else 0.0
    top, runs, totals, n_expressed, status = top_runs(X, 999, log_scale)
    for i in range(n_rows):
        row = X.data[X.indptr[i] : X.indptr[i + 1]]
        np.testing.assert_array_equal(top[i], -np.sort(-row)[:999])
        assert (np.diff(runs[i][0]) < 0).all()  # one run per distinct value
        expected_total = np.expm1(row).sum() if log_scale else row.sum()
        assert totals[i] == pytest.approx(expected_total, rel=1e-12)
    np.testing.assert_array_equal(n_expressed, lengths)
    assert (status == _kernels.OK).all()


@pytest.mark.parametrize(
    ("bad", "code"), [(-1.0, _kernels.NEGATIVE), (np.nan, _kernels.NAN), (np.inf, _kernels.INFINITE)]
)
@pytest.mark.parametrize("other", [2.0, 2.5])
@pytest.mark.parametrize("log_scale", [0.0, 1.0])
def test_top_runs_flag_non_expression(bad, code, other, log_scale):
    """In rows of integers and of other values, with and without a log transform to undo: the first bad value."""
    X = sparse.csr_matrix(np.array([[1.0, other, 3.0], [1.0, bad, other], [np.nan, -1.0, other]]))
    *_, status = top_runs(X, 2, log_scale)
    np.testing.assert_array_equal(status, [_kernels.OK, code, _kernels.NAN])
