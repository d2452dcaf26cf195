r"""The inverse model of C2S: a linear fit of log expression on log rank, used to turn sentences into expression.

Per cell, expression is normalised to the median library size and transformed with ``log10(1 + x)``; over the
expressed genes with 0-based rank ``rank0 < 999`` on a sample of cells, ordinary least squares fits

.. math::

    \log_{10}(1 + x) = \text{intercept} + \text{slope} \cdot \log_{10}(1 + \text{rank0}).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit, prange
from scanpy import logging as logg
from scipy import sparse

from . import _dask
from ._utils._numba import numba_threads
from ._utils._validate import check_number
from .pp import _kernels
from .pp._rank import NOT_EXPRESSION_FIX, as_kernel_dtype, canonical, raise_if_not_expression

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

#: Only the first this many ranks enter the fit.
MAX_RANK = 999
#: Cells sampled for the fit unless the user asks for another number.
DEFAULT_N_CELLS = 2_000
#: Non-integer input whose largest value is at most this is taken as log-transformed (unless it looks normalised:
#: :func:`_input_kind`).
_LOG_MAX = 30.0
#: How far from a whole number a ratio ``r`` of :func:`_whole_multiples` may be: ``1e-3`` plus ``1e-6 · r`` for the
#: rounding of float32 values (about ``1.2e-7 · r``, more after ``expm1``).
_WHOLE_TOLERANCE = (1e-3, 1e-6)
#: Cells of the fit's sample that :func:`_input_kind` reads.
_WHOLE_CELLS = 200
#: Bases tried, in this order, for log-transformed values whose base the data does not record (``uns["log1p"]``
#: lost, e.g. by ``anndata.concat``): the natural logarithm, scanpy's default, then 2 and 10.
_LOG_BASES = (math.e, 2.0, 10.0)
#: Values checked for being integers: blocks of :data:`_LOG_BLOCK` consecutive ones, evenly spaced.
_LOG_SAMPLE = 100_000
_LOG_BLOCK = 1_000
_NOT_FINITE = (
    "The rank → expression fit is not finite: the expression values are too large to normalise. Check the input, "
    "or pass `rank_fit=False`."
)


@dataclass(frozen=True)
class RankFit:
    """Fitted rank → expression line of one dataset: the inverse model that turns sentences into expression.

    :func:`sc_c2s.pp.to_sentences` fits it into ``adata.uns["c2s"]["rank_fit"]`` (as a dict), and
    :func:`sc_c2s.tl.from_sentences` and :func:`sc_c2s.tl.generate` read it back.

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)
    >>> fit = sc_c2s.RankFit.from_dict(adata.uns["c2s"]["rank_fit"])
    >>> round(fit.slope, 2), round(fit.r2, 2)
    (-0.68, 0.91)
    >>> fit.predict([0, 9, 99]).round(2)  # the 1st, 10th and 100th gene of a sentence
    array([2.14, 1.46, 0.79])
    """

    slope: float
    """Change of ``log10(1 + x)`` per unit of ``log10(1 + rank0)``; negative."""
    intercept: float
    """``log10(1 + x)`` of the top-ranked gene."""
    r2: float = float("nan")
    """Coefficient of determination of the fit."""
    pearson_r: float = float("nan")
    """Pearson correlation of log expression and log rank over the fitted points."""
    spearman_rho: float = float("nan")
    """Spearman correlation of expression and rank over the fitted points."""
    n_cells: int = 0
    """Cells in the fit's sample."""
    n_points: int = 0
    """Expressed (cell, gene) pairs with ``rank0 < 999`` in the fit."""
    input: str = "linear"
    """``"linear"`` (counts or normalised) or ``"log1p"`` (already log-transformed, undone before the fit)."""
    target_sum: float = float("nan")
    """Median library size the sampled cells were normalised to."""

    def predict(self, position: ArrayLike) -> np.ndarray | float:
        """Expression, as ``log10(1 + x)`` of normalised counts, of the gene at 0-based ``position`` (``>= 0``).

        An array of positions gives an array of the same shape, a single position a number.
        """
        position = np.asarray(position, dtype=np.float64)
        if not np.all(position >= 0):  # NaN too
            bad = float(position[~(position >= 0)].flat[0])
            msg = f"`position` must be 0-based positions in a sentence (0 is the first gene, none below), got {bad}."
            raise ValueError(msg)
        return np.clip(self.intercept + self.slope * np.log10(1 + position), 0, None)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain dict for ``uns`` or JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | RankFit) -> RankFit:
        """Build from :meth:`to_dict` output, e.g. ``adata.uns["c2s"]["rank_fit"]``; unknown keys are ignored.

        Each field is checked: slope and intercept are finite numbers, the other figures real numbers (NaN where
        unknown), the counts integers ``>= 0`` and ``input`` one of ``"linear"`` and ``"log1p"``. NumPy scalars and
        0-d arrays (as h5ad gives values back) are taken as the numbers they hold.
        """
        if isinstance(d, RankFit):
            return d
        if not isinstance(d, Mapping):
            msg = "A rank fit needs 'slope' and 'intercept'; pass `adata.uns['c2s']['rank_fit']` or a checkpoint's."
            raise ValueError(msg)
        if not {"slope", "intercept"} <= set(d):
            msg = (
                f"A rank fit needs 'slope' and 'intercept', this one has {sorted(d)}. Data ranked apart and joined "
                "by `anndata.concat(uns_merge=...)` keep only the fields all parts share: run "
                "`sc_c2s.pp.to_sentences` on the joined data again, or pass a checkpoint's rank fit."
            )
            raise ValueError(msg)
        return cls(**{f.name: _checked_field(f.name, f.type, d[f.name]) for f in fields(cls) if f.name in d})


def _checked_field(name: str, kind: str, value: Any) -> Any:
    """Return `value` as a field of :class:`RankFit` of type `kind` (``"float"``, ``"int"`` or ``"str"``), or raise."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        value = value.item()
    if name in ("slope", "intercept"):
        return check_number(value, f"rank_fit[{name!r}]")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "float" and number and not math.isinf(value):
        return float(value)
    if kind == "int" and number and value >= 0 and float(value).is_integer():
        return int(value)
    if kind == "str" and isinstance(value, str) and value in ("linear", "log1p"):
        return value
    what = {
        "float": "a real number (NaN where unknown)",
        "int": "an integer >= 0",
        "str": "'linear' or 'log1p'",
    }[kind]
    msg = f"`rank_fit[{name!r}]` must be {what}, got {value!r}."
    raise ValueError(msg)


def sample_cells(n_obs: int, n_cells: int, random_state: int) -> np.ndarray:
    """Sorted indices of the cells in the fit's sample; the same arguments give the same cells."""
    if n_obs <= n_cells:
        return np.arange(n_obs)
    return np.sort(np.random.default_rng(random_state).choice(n_obs, size=n_cells, replace=False))


def is_log_transformed(values: np.ndarray) -> bool:
    """Whether expressed values look log-transformed: not all integers (checked on a sample), and all small.

    Counts, the common input, are told apart on the sample alone, without a pass over all the values.
    """
    starts = np.linspace(0, max(0, values.size - _LOG_BLOCK), _LOG_SAMPLE // _LOG_BLOCK, dtype=np.int64)
    sample = np.concatenate([values[start : start + _LOG_BLOCK] for start in np.unique(starts)])
    sample = sample[sample != 0]
    if sample.size == 0 or np.array_equal(sample, np.round(sample)):
        return False
    return float(values.max()) <= _LOG_MAX


def _one_total(rows: sparse.csr_matrix) -> bool:
    """Whether the cells' totals are all equal (within 0.1 %): normalised to one total and not log-transformed.

    Such values (``normalize_total`` with a small ``target_sum``, or proportions) can look log-transformed to
    :func:`is_log_transformed`; log-transformed values do not sum alike.
    """
    totals = np.asarray(rows.sum(axis=1), dtype=np.float64).ravel()
    totals = totals[totals > 0]
    return totals.size > 1 and np.ptp(totals) <= 1e-3 * totals.max()


def _input_kind(rows: sparse.csr_matrix, log1p_base: float | None, source: str) -> tuple[str, float]:
    """Return what the values of `rows` are, ``"linear"`` or ``"log1p"``, and the natural log of the base to undo.

    Large values or whole numbers are linear (counts, normalised counts), and so are cells that all sum alike
    (:func:`_one_total`). Other values are log-transformed when ``expm1`` (of base `log1p_base`, or where the data
    does not record it the first of :data:`_LOG_BASES` that fits) makes most cells' values whole multiples of their
    smallest, as counts and scaled counts are, since most cells hold a gene counted once; they are counts scaled
    per cell (e.g. by size factors) when they are such multiples themselves. Values that are neither are taken as
    log-transformed (of base `log1p_base`, else e): log-normalised values rounded when stored fail both tests, as
    ``pbmc68k_reduced().raw`` does. At most :data:`_WHOLE_CELLS` cells, evenly spaced, are read: the rule asks about
    most cells, not every one. The base is ``0`` for linear values.
    """
    if not is_log_transformed(rows.data) or _one_total(rows):
        return "linear", 0.0
    rows = rows[:: -(-rows.shape[0] // _WHOLE_CELLS)] if rows.shape[0] > _WHOLE_CELLS else rows
    for base in (log1p_base,) if log1p_base else _LOG_BASES:
        if _whole_multiples(rows.indptr, rows.data, np.log(base)) >= 0.5:
            if not log1p_base and base != math.e:
                logg.info(f"    the values of `{source}` undo as log1p of base {base:g} (`uns['log1p']` does not say)")
            return "log1p", float(np.log(base))
    if _whole_multiples(rows.indptr, rows.data, 0.0) > 0.5:
        return "linear", 0.0
    return "log1p", float(np.log(log1p_base or math.e))


def _whole_multiples(indptr: np.ndarray, data: np.ndarray, log_scale: float) -> float:
    """Share of the rows of a CSR matrix whose positive values are all whole multiples of the row's smallest.

    With ``log_scale > 0`` the values are ``expm1(log_scale * value)``. Rows that tell nothing (see
    :func:`_whole_multiple_rows`: positive values all equal, or none, or the others too large to round) are left
    out; ``0`` when all are.
    """
    whole = _whole_multiple_rows(indptr, data, log_scale, *_WHOLE_TOLERANCE)
    telling = whole >= 0
    return float(whole[telling].mean()) if telling.any() else 0.0


@njit(cache=True)
def _whole_multiple_rows(indptr, data, log_scale, absolute, relative):
    """For each row: 1 if its positive values are whole multiples of its smallest, 0 if not, -1 if none tells.

    A value tells unless it is the smallest, or so large that rounding alone may move it half-way to the next
    multiple (as ``expm1`` of a wrong base makes values). A row stops at its first value that is not a
    multiple, so log-transformed rows cost little more than finding their smallest value.
    """
    n_rows = indptr.size - 1
    whole = np.empty(n_rows, dtype=np.int8)
    for i in range(n_rows):
        smallest, largest = np.inf, 0.0
        for k in range(indptr[i], indptr[i + 1]):
            v = np.expm1(log_scale * np.float64(data[k])) if log_scale > 0 else np.float64(data[k])
            if v > 0:
                smallest, largest = min(smallest, v), max(largest, v)
        whole[i] = -1
        if largest == smallest:
            continue
        for k in range(indptr[i], indptr[i + 1]):
            v = np.expm1(log_scale * np.float64(data[k])) if log_scale > 0 else np.float64(data[k])
            ratio = v / smallest
            if v <= 0 or relative * ratio > 0.25:
                continue
            if abs(ratio - np.round(ratio)) > absolute + relative * ratio:
                whole[i] = 0
                break
            if ratio > 1.5:
                whole[i] = 1
    return whole


def read_rows(X, cells: np.ndarray, *, summed: bool = False) -> sparse.csr_matrix:
    """Read the rows ``cells`` (sorted) of any matrix :func:`sc_c2s.pp.to_sentences` takes as CSR, and no others.

    In-memory, backed and dask matrices alike: a dask array computes only the chunks that hold those rows. A gene
    stored twice in a row is read as the sum, as in the sentences, unless `summed` says ``X`` holds none. Each row's
    genes come in column order, so that sums over a row, and so the fit, do not depend on how ``X`` stores them.
    """
    if _dask.is_dask_array(X):
        X = _dask.with_row_chunks(X)
    rows = X if len(cells) == X.shape[0] and sparse.issparse(X) and X.format == "csr" else X[cells]
    if _dask.is_dask_array(rows):
        rows = rows.compute()
    if rows.dtype.kind == "b" or rows.dtype == np.float16:  # types scipy.sparse does not hold, or sums badly
        rows = rows.astype(np.float32)
    rows = sparse.csr_matrix(as_kernel_dtype(rows))
    rows = rows if summed else canonical(rows)
    return rows if rows.has_sorted_indices else rows.sorted_indices()


@dataclass(frozen=True)
class _Sample:
    """The fit's data for a sample of cells, as runs of equal values: each cell's ranked genes, best first."""

    run_y: np.ndarray
    """Cells × runs: ``log10(1 + normalised expression)`` of each run, descending within a cell."""
    run_counts: np.ndarray
    """Ranked genes in each run."""
    n_runs: np.ndarray
    """Runs of each cell: row ``i`` of the arrays above is meaningful up to ``n_runs[i]``."""
    n_ranked: np.ndarray
    """Ranked genes of each cell (at most :data:`MAX_RANK`)."""
    input: str
    """``"linear"`` or ``"log1p"``, as :attr:`RankFit.input`."""
    target_sum: float
    """Median library size the cells were normalised to."""


def _sample(X, cells: np.ndarray, *, log1p_base: float | None, source: str, fix: str, summed: bool) -> _Sample:
    """Return the fit's data for the given cells: ``log10(1 + normalised expression)`` of their ranked genes.

    The fit needs the values at each rank, not which gene holds them: the values are ordered without the genes,
    equal values need no tie-break and form runs (most of a cell's ranked genes, in counts), and only the best
    :data:`MAX_RANK` of a cell are ordered. The logarithm is taken once per run. Values that are not expression
    raise :class:`~sc_c2s.pp.NotExpressionError` naming `source` and ending with `fix`; values too large to
    normalise (a cell's total or a normalised value beyond the floating-point range), a :class:`ValueError`.
    """
    rows = read_rows(X, cells, summed=summed)
    kind, log_scale = _input_kind(rows, log1p_base, source)
    n_rows = rows.shape[0]
    width = min(MAX_RANK, int(np.diff(rows.indptr).max(initial=0)))
    run_y = np.empty((n_rows, width))
    run_counts = np.empty((n_rows, width), dtype=np.int32)
    n_runs = np.zeros(n_rows, dtype=np.int32)
    totals = np.zeros(n_rows)
    n_expressed = np.zeros(n_rows, dtype=np.int32)
    status = np.zeros(n_rows, dtype=np.int8)
    with numba_threads() as n_threads:
        n_chunks = max(1, min(n_rows, 2 * n_threads))  # each allocates histograms of 1 MB
        _kernels.top_runs(
            rows.indptr, rows.data, log_scale, n_chunks, run_y, run_counts, n_runs, totals, n_expressed, status
        )
        raise_if_not_expression(status, cells, source, fix)
        if not np.isfinite(totals).all():  # finite values whose sum overflows
            raise ValueError(_NOT_FINITE)
        target_sum = float(np.median(totals[totals > 0])) if np.any(totals > 0) else 1.0
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        if _log_runs(run_y, n_runs, log_scale, scale) > 0:
            raise ValueError(_NOT_FINITE)
    return _Sample(run_y, run_counts, n_runs, np.minimum(n_expressed, width), kind, target_sum)


@njit(parallel=True, cache=True)
def _log_runs(run_values, n_runs, log_scale, scale):
    """Replace each stored run value ``v`` of cell ``i`` by ``log10(1 + scale[i] * x)``, in place.

    ``x`` is ``expm1(log_scale * v)`` for ``log_scale > 0`` (a ``log1p`` transform undone), else ``v``. Returns the
    number of results that are not finite.
    """
    n_not_finite = 0
    for i in prange(n_runs.shape[0]):
        for r in range(n_runs[i]):
            v = run_values[i, r]
            x = np.expm1(log_scale * v) if log_scale > 0 else v
            y = np.log10(1 + x * scale[i])
            run_values[i, r] = y
            n_not_finite += not np.isfinite(y)
    return n_not_finite


def rank_points(
    X,
    cells: np.ndarray,
    *,
    log1p_base: float | None = None,
    source: str = "X",
    fix: str = NOT_EXPRESSION_FIX,
) -> tuple[np.ndarray, np.ndarray, str, float]:
    """Points of the fit for the given cells: ``log10(1 + rank0)`` and ``log10(1 + normalised expression)``.

    Reads only the sampled rows, on a copy; ``X`` is not modified. `source` and `fix` are for the message of data
    that is not expression, as in :func:`fit`.

    Returns
    -------
    ``(log_rank, log_expression, input, target_sum)``.
    """
    sample = _sample(X, cells, log1p_base=log1p_base, source=source, fix=fix, summed=False)
    in_run = np.arange(sample.run_y.shape[1]) < sample.n_runs[:, None]
    log_expression = np.repeat(sample.run_y[in_run], sample.run_counts[in_run])
    n_ranked = sample.n_ranked.astype(np.int64)
    rank0 = np.arange(n_ranked.sum()) - np.repeat(np.cumsum(n_ranked) - n_ranked, n_ranked)
    return np.log10(1 + rank0), log_expression, sample.input, sample.target_sum


@njit(cache=True)
def _sums(run_y, run_counts, n_runs, prefix_x, prefix_x_rank, shift):
    """One pass over the runs: sums for the line, and each run's value, number of points and summed x ranks.

    ``prefix_x[p]`` and ``prefix_x_rank[p]`` are the sums of the centred ``log10(1 + rank0)`` and of the centred
    average ranks of the positions before ``p``. Returns ``(sum_dy, sum_dy2, sum_dxdy, y, size, x_rank)`` with
    ``dy = y - shift`` summed over the points, and the runs of all cells one after the other.
    """
    total = 0
    for i in range(n_runs.shape[0]):
        total += n_runs[i]
    y = np.empty(total)
    size = np.empty(total, dtype=np.int64)
    x_rank = np.empty(total)
    sum_dy = sum_dy2 = sum_dxdy = 0.0
    r_all = 0
    for i in range(n_runs.shape[0]):
        p = 0
        for r in range(n_runs[i]):
            c = np.int64(run_counts[i, r])
            dy = run_y[i, r] - shift
            sum_dy += c * dy
            sum_dy2 += c * dy * dy
            sum_dxdy += dy * (prefix_x[p + c] - prefix_x[p])
            y[r_all] = run_y[i, r]
            size[r_all] = c
            x_rank[r_all] = prefix_x_rank[p + c] - prefix_x_rank[p]
            r_all += 1
            p += c
    return sum_dy, sum_dy2, sum_dxdy, y, size, x_rank


@njit(cache=True)
def _rank_products(y, size, x_rank, mid):
    """Spearman's sums from the runs sorted by value: runs of equal value form one group of ties.

    Returns ``(sum of centred expression rank × centred x rank, sum of squared centred expression ranks)`` over the
    points; ``mid`` is the mean rank.
    """
    products = squares = 0.0
    below = 0
    start = 0
    while start < y.shape[0]:
        stop, n_tied, x_rank_sum = start, 0, 0.0
        while stop < y.shape[0] and y[stop] == y[start]:
            n_tied += size[stop]
            x_rank_sum += x_rank[stop]
            stop += 1
        rank = below + (n_tied + 1) / 2 - mid  # average rank of the tied points, centred
        products += rank * x_rank_sum
        squares += n_tied * rank * rank
        below += n_tied
        start = stop
    return products, squares


def _statistics(sample: _Sample) -> tuple[float, float, float, float, int]:
    """Least-squares line, Pearson r and Spearman ρ of the points of :func:`rank_points`, from their counts.

    The points are never gathered: each rank position is one value of ``log10(1 + rank0)``, so its ranks come from
    the number of cells that reach each position, and the expression ranks from the runs of equal values (only the
    runs are sorted).

    Returns
    -------
    ``(slope, intercept, pearson_r, spearman_rho, n_points)``.
    """
    n_ranked = sample.n_ranked
    width = int(n_ranked.max())
    per_position = np.cumsum(np.bincount(n_ranked, minlength=width + 1)[::-1])[::-1][1:]  # points at each position
    n = int(per_position.sum())
    x_values = np.log10(1 + np.arange(width))
    x_mean = float(per_position @ x_values) / n
    x_values -= x_mean
    mid = (n + 1) / 2  # mean of the ranks 1 … n
    x_rank = np.cumsum(per_position) - (per_position - 1) / 2 - mid  # average rank of each position, centred
    shift = float(sample.run_y[np.argmax(sample.n_runs > 0), 0])
    sum_dy, sum_dy2, sxy, run_y, run_size, run_x_rank = _sums(
        sample.run_y,
        sample.run_counts,
        sample.n_runs,
        np.append(0, np.cumsum(x_values)),
        np.append(0, np.cumsum(x_rank)),
        shift,
    )
    sxx = float(per_position @ x_values**2)
    syy = sum_dy2 - sum_dy**2 / n
    slope = sxy / sxx
    y_mean = shift + sum_dy / n

    order = np.argsort(run_y)
    numerator, y_rank_ss = _rank_products(run_y[order], run_size[order], run_x_rank[order], mid)
    spearman = numerator / np.sqrt(float(per_position @ x_rank**2) * y_rank_ss)
    return slope, y_mean - slope * x_mean, float(sxy / np.sqrt(sxx * syy)), spearman, n


def fit(
    X,
    *,
    n_cells: int = DEFAULT_N_CELLS,
    random_state: int = 0,
    log1p_base: float | None = None,
    source: str = "X",
    fix: str = NOT_EXPRESSION_FIX,
    summed: bool = False,
) -> RankFit:
    """Fit the rank → expression line on a seeded sample of ``n_cells`` cells of ``X``.

    Values that are not expression raise :class:`~sc_c2s.pp.NotExpressionError` naming `source` (e.g.
    ``"raw.X"``) and ending with `fix`, what the user can do about it. `summed` says that an in-memory CSR ``X``
    holds each gene at most once per row (from :func:`~sc_c2s.pp._rank.canonical`), which saves checking it again.
    """
    cells = sample_cells(X.shape[0], n_cells, random_state)
    sample = _sample(X, cells, log1p_base=log1p_base, source=source, fix=fix, summed=summed)
    expressing = np.flatnonzero(sample.n_runs > 0)  # runs are sorted, so each cell's first and last bound it
    if (
        sample.n_ranked.sum() < 3
        or sample.n_ranked.max(initial=0) < 2
        or sample.run_y[expressing, 0].max() == sample.run_y[expressing, sample.n_runs[expressing] - 1].min()
    ):
        msg = (
            "Too few expressed genes, or expressed values all equal, to fit the rank → expression model; pass "
            "`rank_fit=False`."
        )
        raise ValueError(msg)
    if (sample.n_runs[expressing] == 1).all():
        msg = (
            "Every cell's expressed values are equal (binarised data?), so their order is the tie-break's, not "
            "expression's, and no rank → expression line can be fitted. Rank counts or normalised values "
            "(`layer=`, `use_raw=`), or pass `rank_fit=False`."
        )
        raise ValueError(msg)
    slope, intercept, pearson, spearman, n_points = _statistics(sample)
    return RankFit(
        slope=float(slope),
        intercept=float(intercept),
        r2=pearson**2,
        pearson_r=pearson,
        spearman_rho=float(spearman),
        n_cells=len(cells),
        n_points=n_points,
        input=sample.input,
        target_sum=sample.target_sum,
    )
