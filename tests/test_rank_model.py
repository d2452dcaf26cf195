"""The rank ↔ expression model: fit, prediction, serialisation, detection of log input."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

import sc_c2s
from sc_c2s import _rank_model
from sc_c2s._rank_model import RankFit


def test_predict_is_the_line_clipped_at_zero():
    fit = RankFit(slope=-1.0, intercept=1.5)
    np.testing.assert_allclose(fit.predict([0, 9, 99, 999]), [1.5, 0.5, 0.0, 0.0])
    assert fit.predict(0) == pytest.approx(1.5)
    np.testing.assert_allclose(RankFit(slope=-0.68, intercept=2.24).predict(np.array([1])), [2.24 - 0.68 * np.log10(2)])


def test_fit_normalises_to_the_median_library_size():
    """Totals 10, 20 and 60: the median (20), not the mean (30), is the target; every cell then reads [12, 8]."""
    fit = _rank_model.fit(np.array([[6.0, 4.0], [12.0, 8.0], [36.0, 24.0]]), n_cells=10)
    assert fit.target_sum == 20.0
    assert fit.intercept == pytest.approx(np.log10(13))
    assert fit.slope == pytest.approx((np.log10(9) - np.log10(13)) / np.log10(2))


def test_dict_round_trip():
    fit = RankFit(slope=-0.7, intercept=2.2, r2=0.8, pearson_r=-0.89, spearman_rho=-0.9, n_cells=10, n_points=99)
    d = fit.to_dict()
    assert d["slope"] == -0.7
    assert d["input"] == "linear"
    assert RankFit.from_dict(d) == fit
    assert RankFit.from_dict(fit) is fit


def test_from_dict_takes_what_h5ad_gives_back():
    """Values read back from h5ad are numpy scalars; unknown keys are ignored."""
    fit = RankFit.from_dict({"slope": np.float64(-0.5), "intercept": np.float32(2.0), "n_cells": np.int64(3), "x": 1})
    assert fit == RankFit(slope=-0.5, intercept=2.0, n_cells=3)
    assert type(fit.slope) is float
    assert type(fit.n_cells) is int


def test_from_dict_needs_slope_and_intercept():
    with pytest.raises(ValueError, match=r"A rank fit needs 'slope' and 'intercept'"):
        RankFit.from_dict({"intercept": 2.0})


def test_sample_cells():
    np.testing.assert_array_equal(_rank_model.sample_cells(5, 10, 0), np.arange(5))
    a = _rank_model.sample_cells(1000, 100, 0)
    assert len(np.unique(a)) == 100
    assert np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, _rank_model.sample_cells(1000, 100, 0))
    assert not np.array_equal(a, _rank_model.sample_cells(1000, 100, 1))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 1, 5, 300]), False),  # counts
        (np.log1p(np.array([0, 1, 5, 300])), True),  # log1p of counts
        (np.array([0.0, 12.5, 80.3, 1000.2]), False),  # normalised, not logged
        (np.array([0.0, 0.0]), False),  # nothing expressed
        (np.array([0, 2, 4.0]), False),  # integers stored as floats
    ],
    ids=["counts", "log1p", "normalised", "empty", "float_counts"],
)
def test_is_log_transformed(values, expected):
    assert _rank_model.is_log_transformed(values) is expected


@pytest.mark.parametrize("target_sum", [1.0, 10.0])
def test_normalised_values_that_look_logged_are_linear(pbmc4k, target_sum):
    """normalize_total to a small total without log1p was taken for log1p (non-integers, all small) and expm1'd."""
    normalised = sc.pp.normalize_total(pbmc4k, target_sum=target_sum, copy=True).X
    assert _rank_model.is_log_transformed(normalised.data)
    fit = _rank_model.fit(normalised)
    assert fit.input == "linear"
    assert fit.target_sum == pytest.approx(target_sum, rel=1e-5)
    logged = _rank_model.fit(sc.pp.log1p(normalised.copy()))
    assert logged.input == "log1p"
    assert logged.target_sum == pytest.approx(target_sum, rel=1e-5)
    assert (logged.slope, logged.intercept) == pytest.approx((fit.slope, fit.intercept), rel=1e-5)


def test_normalised_values_without_their_largest_genes_are_linear(pbmc4k):
    """normalize_total, then the 100 most expressed genes dropped (as HVG selection does): values all small and
    totals unequal were taken for log1p and expm1'd; each cell's values are whole multiples of its smallest."""
    normalised = sc.pp.normalize_total(pbmc4k, copy=True).X
    top = np.argsort(-np.asarray(normalised.mean(axis=0)).ravel())[:100]
    normalised = normalised[:, np.setdiff1d(np.arange(normalised.shape[1]), top)]
    assert _rank_model.is_log_transformed(normalised.data)
    assert not _rank_model._one_total(normalised)
    fit = _rank_model.fit(normalised)
    assert fit.input == "linear"
    logged = _rank_model.fit(sc.pp.log1p(normalised.copy()))
    assert logged.input == "log1p"
    assert (logged.slope, logged.intercept, logged.target_sum) == pytest.approx(
        (fit.slope, fit.intercept, fit.target_sum), rel=1e-5
    )
    log2 = _rank_model.fit(sc.pp.log1p(normalised.copy(), base=2), log1p_base=2.0)
    assert log2.input == "log1p"
    assert (log2.slope, log2.intercept) == pytest.approx((fit.slope, fit.intercept), rel=1e-5)


def test_whole_multiples_by_hand():
    """Rows whose positive values are all whole multiples of the smallest; all-equal and empty rows tell nothing."""
    X = sparse.csr_matrix(
        np.array([[0.5, 1.0, 1.5, 0], [0.4, 1.0, 0, 0], [0.3, 0.3, 0, 0], [0, 0, 0, 0], [2.0, 0, 8.0, 6.0]])
    )
    assert _rank_model._whole_multiples(X.indptr, X.data, 0.0) == pytest.approx(2 / 3)  # rows 0 and 4 of 0, 1, 4
    assert _rank_model._whole_multiples(X.indptr[:4], X.data[: X.indptr[3]], 0.0) == 0.5
    logged = X.copy()
    logged.data = np.log1p(logged.data)
    assert _rank_model._whole_multiples(logged.indptr, logged.data, 1.0) == pytest.approx(2 / 3)
    assert _rank_model._whole_multiples(logged.indptr, logged.data, 0.0) == 0.0


def test_values_too_large_to_round_tell_nothing():
    """Scaled counts read back through a wrong base grow so large (here 2e6 times the smallest) that the tolerance of
    rounding covers any number: every such row passed as whole multiples, and two cells of scaled counts were taken
    for log1p of base 10."""
    X = sparse.csr_matrix(np.array([[6.3, 12.6, 0.0], [1.1, 2.2, 0.0]]))  # 1 and 2 counts, scaled per cell
    whole = _rank_model._whole_multiple_rows(X.indptr, X.data, np.log(10), *_rank_model._WHOLE_TOLERANCE)
    assert whole.tolist() == [-1, 0]  # row 0 tells nothing through base 10, row 1 is no multiple
    assert _rank_model._input_kind(X, None, "X") == ("linear", 0.0)


def test_fit_on_a_hand_built_matrix():
    """Two cells whose values follow the line exactly: the fit recovers it."""
    slope, intercept = -1.0, np.log10(12)
    # log10(1 + x) = line: 1 + x = 12 / (1 + rank); whole numbers, so both cells' totals are exactly equal in any
    # summation order and their equal values tie exactly (with numpy 1.26 a last-bit difference broke the ties)
    target = np.array([11.0, 5.0, 3.0, 2.0])
    X = np.vstack([target, target[::-1]])  # both cells have the same library size: no rescaling
    fit = _rank_model.fit(X, n_cells=10)
    assert fit.slope == pytest.approx(slope)
    assert fit.intercept == pytest.approx(intercept)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.pearson_r == pytest.approx(-1.0)
    assert fit.spearman_rho == pytest.approx(-1.0)
    assert (fit.n_cells, fit.n_points, fit.input) == (2, 8, "linear")
    assert fit.target_sum == pytest.approx(target.sum())


def test_fit_keeps_only_the_first_999_ranks():
    X = np.arange(1500, 0, -1, dtype=np.float64)[None, :]
    fit = _rank_model.fit(sparse.csr_matrix(X))
    assert fit.n_points == _rank_model.MAX_RANK == 999


def test_fit_does_not_depend_on_storage_or_seed_when_all_cells_are_used(pbmc4k):
    X = pbmc4k.X
    fits = [
        _rank_model.fit(X, random_state=0),
        _rank_model.fit(X.tocsc(), random_state=0),
        _rank_model.fit(X.toarray(), random_state=0),
        _rank_model.fit(X, random_state=5),  # another tie order: the same (rank, value) pairs
    ]
    for other in fits[1:]:
        for key in ["slope", "intercept", "r2", "spearman_rho", "n_points", "target_sum"]:
            assert getattr(other, key) == pytest.approx(getattr(fits[0], key), rel=1e-9), key


def test_fit_is_exactly_the_same_whatever_the_order_of_genes_within_rows(pbmc4k):
    """A row's total was summed in the order its genes are stored: CSR rows with their genes out of order (as in
    `pbmc68k_reduced().raw`) fitted another line than sorted ones, CSC or dense, in the last digits."""
    X = sparse.csr_matrix(np.log1p(pbmc4k.X.astype(np.float64)))  # sums of non-integers depend on their order
    unsorted = X.copy()
    for row in range(unsorted.shape[0]):  # each row's genes in reverse order
        span = slice(unsorted.indptr[row], unsorted.indptr[row + 1])
        unsorted.indices[span], unsorted.data[span] = unsorted.indices[span][::-1], unsorted.data[span][::-1]
    unsorted.has_sorted_indices = False
    assert not unsorted.has_sorted_indices
    fits = [_rank_model.fit(M, random_state=0, log1p_base=np.e) for M in (X, unsorted, X.tocsc(), X.toarray())]
    assert all(fit == fits[0] for fit in fits[1:])
    assert not unsorted.has_sorted_indices  # the user's matrix is left as it is


@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_fit_does_not_modify_log_input(dense):
    rng = np.random.default_rng(0)
    X = np.log1p(rng.poisson(1.0, size=(50, 40)).astype(np.float64))
    X = X if dense else sparse.csr_matrix(X)
    before = X.copy()
    fit = _rank_model.fit(X)
    assert fit.input == "log1p"
    np.testing.assert_array_equal(X if dense else X.toarray(), before if dense else before.toarray())


def test_log_base_is_undone():
    rng = np.random.default_rng(1)
    counts = rng.poisson(2.0, size=(60, 50)).astype(np.float64)
    counts[:, 0] += 1  # every cell expresses a gene
    linear = _rank_model.fit(counts)
    log2 = _rank_model.fit(np.log1p(counts) / np.log(2), log1p_base=2.0)
    assert log2.input == "log1p"
    assert log2.slope == pytest.approx(linear.slope, rel=1e-9)
    assert log2.intercept == pytest.approx(linear.intercept, rel=1e-9)


def test_fit_sums_a_gene_stored_twice(pbmc4k):
    """Duplicate entries of a CSR row were fitted as two expressed genes; the sentences read them as the sum."""
    X = pbmc4k.X[:200]
    rows = list(zip(X.indptr[:-1], X.indptr[1:], strict=True))
    twice = sparse.csr_matrix(
        (
            np.concatenate([np.tile(X.data[a:b], 2) for a, b in rows]),
            np.concatenate([np.tile(X.indices[a:b], 2) for a, b in rows]),
            2 * X.indptr,
        ),
        shape=X.shape,
    )
    assert not twice.has_canonical_format
    for n_cells in (200, 50):  # all rows, and rows read by index
        fit, expected = (_rank_model.fit(M, n_cells=n_cells) for M in (twice, 2 * X))
        for key in ["slope", "intercept", "r2", "spearman_rho", "n_points", "target_sum"]:
            assert getattr(fit, key) == pytest.approx(getattr(expected, key), rel=1e-9), key


def test_fit_refuses_a_total_too_large_to_normalise():
    """A cell whose values are finite but whose total overflows was fitted as a cell of zeros, silently."""
    X = np.array([[1.5e308, 1.2e308, 1e308], [3.0, 2.0, 1.0]])
    with pytest.raises(ValueError, match="not finite: the expression values are too large to normalise"):
        _rank_model.fit(X)


def test_too_few_points():
    X = sparse.csr_matrix(np.eye(4))  # one gene per cell: every point at rank 0
    with pytest.raises(ValueError, match=r"Too few expressed genes.*pass `rank_fit=False`"):
        _rank_model.fit(X)


def test_fit_names_the_source_of_values_that_are_not_expression():
    """The fit used to call every matrix `X`."""
    X = np.ones((5, 4))
    X[3, 2] = -1
    match = r"^`raw.X` holds negative values \(first in cell 3\), so it is not expression data: .*\. Do this\.$"
    with pytest.raises(ValueError, match=match):
        _rank_model.fit(X, source="raw.X", fix="Do this.")
    with pytest.raises(ValueError, match=match):
        _rank_model.rank_points(X, np.arange(5), source="raw.X", fix="Do this.")


def test_fitted_figures_are_python_numbers():
    """`spearman_rho` used to be a numpy float64 beside Python floats."""
    X = sparse.random(30, 50, density=0.5, random_state=0, format="csr") * 10
    fit = _rank_model.fit(X.ceil())
    for name, value in fit.to_dict().items():
        assert type(value) is {"n_cells": int, "n_points": int, "input": str}.get(name, float), name


@pytest.mark.parametrize("position", [-1, -5, [0, 3, -0.5], np.nan])
def test_predict_refuses_negative_positions(position):
    """Position -1 used to give inf and -5 NaN, with numpy's warnings."""
    with pytest.raises(ValueError, match=r"`position` must be 0-based positions in a sentence"):
        RankFit(slope=-0.7, intercept=2.0).predict(position)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("r2", "x", r"`rank_fit\['r2'\]` must be a real number \(NaN where unknown\), got 'x'"),
        ("spearman_rho", float("inf"), r"`rank_fit\['spearman_rho'\]` must be a real number"),
        ("pearson_r", True, r"`rank_fit\['pearson_r'\]` must be a real number"),
        ("n_cells", -3, r"`rank_fit\['n_cells'\]` must be an integer >= 0, got -3"),
        ("n_points", 2.5, r"`rank_fit\['n_points'\]` must be an integer >= 0"),
        ("input", "log2", r"`rank_fit\['input'\]` must be 'linear' or 'log1p', got 'log2'"),
        ("target_sum", None, r"`rank_fit\['target_sum'\]` must be a real number"),
    ],
)
def test_from_dict_checks_every_field(field, value, match):
    """Only slope and intercept used to be checked: `{"r2": "x"}` made a RankFit whose R² was a string."""
    with pytest.raises(ValueError, match=match):
        RankFit.from_dict({"slope": -0.5, "intercept": 2.0, field: value})


def test_from_dict_takes_0d_arrays():
    """h5ad can give scalars back as 0-d arrays; they used to be refused as "must be a finite number"."""
    fit = RankFit.from_dict(
        {"slope": np.array(-0.5), "intercept": np.array(2), "r2": np.array(np.nan), "n_cells": np.array(7)}
    )
    assert (fit.slope, fit.intercept, fit.n_cells) == (-0.5, 2.0, 7)
    assert np.isnan(fit.r2)
    assert (type(fit.slope), type(fit.intercept), type(fit.n_cells)) == (float, float, int)


def test_the_log_base_is_found_where_the_data_does_not_record_it(pbmc4k, scanpy_log):
    """`anndata.concat` drops `uns["log1p"]`: log2 values were undone as natural logs, fitted to 1.5e5 counts."""
    sc.pp.normalize_total(pbmc4k, target_sum=1e4)
    sc.pp.log1p(pbmc4k, base=2)
    recorded = _rank_model.fit(pbmc4k.X, log1p_base=2)
    found = _rank_model.fit(pbmc4k.X)
    assert found == recorded
    assert (found.input, found.target_sum) == ("log1p", pytest.approx(1e4))
    assert "the values of `X` undo as log1p of base 2 (`uns['log1p']` does not say)" in scanpy_log.getvalue()


def test_binarised_data_is_refused():
    """Every cell's values tie: the old check compared values across cells, which normalisation sets apart."""
    X = sparse.csr_matrix(np.array([[1, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"Every cell's expressed values are equal \(binarised data\?\)"):
        _rank_model.fit(X)


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        (lambda X: X, None),  # counts: R^2 0.87
        (lambda X: sparse.csr_matrix(X.multiply(1 / X.sum(axis=1))), "its cells sum to a median of 1, a scale"),
        (lambda X: _nearly_binarised(X), "most cells' expressed values are equal (binarised data?)"),
    ],
    ids=["counts", "proportions", "nearly-binarised"],
)
def test_a_fit_that_explains_little_is_announced(pbmc4k, scanpy_log, change, cause):
    """Both gave a flat line (R^2 0.41 and 0.07 on Kang's cells) without a word, and generated cells read back
    nearly constant; only data whose every cell ties throughout was refused."""
    adata = pbmc4k.copy()
    adata.X = change(sparse.csr_matrix(adata.X, dtype=np.float64))
    sc_c2s.pp.to_sentences(adata, sentences=False)
    assert (adata.uns["c2s"]["rank_fit"]["r2"] < 0.5) == (cause is not None)
    log = scanpy_log.getvalue()
    assert ("The rank fit explains little of the expression" in log) == (cause is not None)
    assert cause is None or cause in log


def _nearly_binarised(X: sparse.csr_matrix) -> sparse.csr_matrix:
    X = (X > 0).astype(np.float64).tocsr()
    X.data[0] = 2.0
    return X
