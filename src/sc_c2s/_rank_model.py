r"""The inverse model of C2S: a linear fit of log expression on log rank, used to turn sentences into expression.

Per cell, expression is normalised to the median library size and transformed with ``log10(1 + x)``; over the
expressed genes with 0-based rank ``rank0 < 999`` on a sample of cells, ordinary least squares fits

.. math::

    \log_{10}(1 + x) = \text{intercept} + \text{slope} \cdot \log_{10}(1 + \text{rank0}).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numba import njit
from scipy import sparse

from ._utils._numba import numba_threads
from ._utils._validate import check_number
from .pp import _kernels
from .pp._rank import raise_if_not_expression

#: Only the first this many ranks enter the fit.
MAX_RANK = 999
#: Cells sampled for the fit unless the user asks for another number.
DEFAULT_N_CELLS = 2_000
#: Non-integer input whose largest value is at most this is taken as log-transformed.
_LOG_MAX = 30.0
#: Values checked for being integers, evenly spaced over the expressed entries.
_LOG_SAMPLE = 100_000


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

    def predict(self, position: np.ndarray | int) -> np.ndarray:
        """Expression, as ``log10(1 + x)`` of normalised counts, of the gene at 0-based ``position``."""
        position = np.asarray(position, dtype=np.float64)
        return np.clip(self.intercept + self.slope * np.log10(1 + position), 0, None)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain dict for ``uns`` or JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | RankFit) -> RankFit:
        """Build from :meth:`to_dict` output, e.g. ``adata.uns["c2s"]["rank_fit"]``; unknown keys are ignored."""
        if isinstance(d, RankFit):
            return d
        if not isinstance(d, Mapping) or not {"slope", "intercept"} <= set(d):
            msg = "A rank fit needs 'slope' and 'intercept'; pass `adata.uns['c2s']['rank_fit']` or a checkpoint's."
            raise ValueError(msg)
        for name in ("slope", "intercept"):
            check_number(d[name], f"rank_fit[{name!r}]")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v.item() if isinstance(v, np.generic) else v for k, v in d.items() if k in names})


def sample_cells(n_obs: int, n_cells: int, random_state: int) -> np.ndarray:
    """Sorted indices of the cells in the fit's sample; the same arguments give the same cells."""
    if n_obs <= n_cells:
        return np.arange(n_obs)
    return np.sort(np.random.default_rng(random_state).choice(n_obs, size=n_cells, replace=False))


def is_log_transformed(values: np.ndarray) -> bool:
    """Whether expressed values look log-transformed: small, and not all integers (checked on a sample)."""
    if values.size == 0 or float(values.max()) > _LOG_MAX:
        return False
    sample = values[:: max(1, values.size // _LOG_SAMPLE)]
    sample = sample[sample != 0]
    if sample.size == 0:
        return False
    return not np.array_equal(sample, np.round(sample))


def read_rows(X, cells: np.ndarray) -> sparse.csr_matrix:
    """Read the rows ``cells`` (sorted) of any matrix :func:`sc_c2s.pp.to_sentences` takes as CSR, and no others.

    In-memory, backed and dask matrices alike: a dask array computes only the chunks that hold those rows.
    """
    rows = X if len(cells) == X.shape[0] and sparse.issparse(X) and X.format == "csr" else X[cells]
    if hasattr(rows, "compute"):  # a dask array
        rows = rows.compute()
    if rows.dtype.kind == "b" or rows.dtype == np.float16:  # types scipy.sparse does not hold, or sums badly
        rows = rows.astype(np.float32)
    return sparse.csr_matrix(rows)


def _sample(X, cells: np.ndarray, *, log1p_base: float | None) -> tuple[np.ndarray, np.ndarray, str, float]:
    """Return the fit's data for the given cells: ``log10(1 + normalised expression)`` of their ranked genes.

    The fit needs the values at each rank, not which gene holds them, so the values are sorted without the
    genes: equal values need no tie-break, and only the best :data:`MAX_RANK` of a cell are sorted.

    Returns
    -------
    ``(log_expression, n_ranked, input, target_sum)``: a cells × ranks array, best first, whose row ``i`` is
    meaningful up to ``n_ranked[i]``.
    """
    rows = read_rows(X, cells)
    kind = "log1p" if is_log_transformed(rows.data) else "linear"
    totals = np.empty(rows.shape[0])
    log_scale = 0.0 if kind == "linear" else np.log(log1p_base) if log1p_base else 1.0
    width = min(MAX_RANK, int(np.diff(rows.indptr).max(initial=0)))
    log_expression = np.zeros((rows.shape[0], width))
    n_expressed = np.zeros(rows.shape[0], dtype=np.int32)
    status = np.zeros(rows.shape[0], dtype=np.int8)
    with numba_threads() as n_threads:
        _kernels.row_totals(rows.indptr, rows.data, log_scale, totals)
        target_sum = float(np.median(totals[totals > 0])) if np.any(totals > 0) else 1.0
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        n_chunks = max(1, min(rows.shape[0], 2 * n_threads))  # each allocates a histogram of 512 kB
        _kernels.top_log_values(rows.indptr, rows.data, log_scale, scale, n_chunks, log_expression, n_expressed, status)
    raise_if_not_expression(status, cells, "X")
    n_ranked = np.minimum(n_expressed, width)
    return log_expression[:, : int(n_ranked.max(initial=0))], n_ranked, kind, target_sum


def rank_points(X, cells: np.ndarray, *, log1p_base: float | None = None) -> tuple[np.ndarray, np.ndarray, str, float]:
    """Points of the fit for the given cells: ``log10(1 + rank0)`` and ``log10(1 + normalised expression)``.

    Reads only the sampled rows, on a copy; ``X`` is not modified.

    Returns
    -------
    ``(log_rank, log_expression, input, target_sum)``.
    """
    log_expression, n_ranked, kind, target_sum = _sample(X, cells, log1p_base=log1p_base)
    ranked = np.arange(log_expression.shape[1]) < n_ranked[:, None]
    log_rank = np.broadcast_to(np.log10(1 + np.arange(log_expression.shape[1])), log_expression.shape)[ranked]
    return log_rank, log_expression[ranked], kind, target_sum


@njit(cache=True)
def _sums(log_expression, n_ranked, x_values, x_rank, shift):
    """One pass over the points: sums for the line, and the runs of equal values within each cell.

    Returns ``(sum_dy, sum_dy2, sum_dxdy, run_y, run_size, run_x_rank)`` with ``dy = y - shift``, ``dx`` centred
    by the caller through `x_values`, and per run its value, number of points and summed centred x ranks.
    """
    n = 0
    for i in range(n_ranked.shape[0]):
        n += n_ranked[i]
    run_y = np.empty(n)
    run_size = np.zeros(n, dtype=np.int64)
    run_x_rank = np.zeros(n)
    n_runs = 0
    sum_dy = sum_dy2 = sum_dxdy = 0.0
    for i in range(n_ranked.shape[0]):
        for p in range(n_ranked[i]):
            y = log_expression[i, p]
            dy = y - shift
            sum_dy += dy
            sum_dy2 += dy * dy
            sum_dxdy += x_values[p] * dy
            if p == 0 or y != log_expression[i, p - 1]:
                run_y[n_runs] = y
                n_runs += 1
            run_size[n_runs - 1] += 1
            run_x_rank[n_runs - 1] += x_rank[p]
    return sum_dy, sum_dy2, sum_dxdy, run_y[:n_runs], run_size[:n_runs], run_x_rank[:n_runs]


def _statistics(log_expression: np.ndarray, n_ranked: np.ndarray) -> tuple[float, float, float, float, int]:
    """Least-squares line, Pearson r and Spearman ρ of the points of :func:`rank_points`, from their counts.

    The points are never gathered nor sorted: each rank position is one value of ``log10(1 + rank0)``, so its ranks
    come from the number of cells that reach each position, and the expression ranks from the runs of equal
    values, which a cell's ranked values form already (only the runs are sorted).

    Returns
    -------
    ``(slope, intercept, pearson_r, spearman_rho, n_points)``.
    """
    width = log_expression.shape[1]
    per_position = np.cumsum(np.bincount(n_ranked, minlength=width + 1)[::-1])[::-1][1:]  # points at each position
    n = int(per_position.sum())
    x_values = np.log10(1 + np.arange(width))
    x_mean = float(per_position @ x_values) / n
    x_values -= x_mean
    mid = (n + 1) / 2  # mean of the ranks 1 … n
    x_rank = np.cumsum(per_position) - (per_position - 1) / 2 - mid  # average rank of each position, centred
    shift = float(log_expression[np.argmax(n_ranked > 0), 0])
    sum_dy, sum_dy2, sxy, run_y, run_size, run_x_rank = _sums(
        log_expression, n_ranked.astype(np.int64), x_values, x_rank, shift
    )
    sxx = float(per_position @ x_values**2)
    syy = sum_dy2 - sum_dy**2 / n
    slope = sxy / sxx
    y_mean = shift + sum_dy / n

    order = np.argsort(run_y, kind="stable")
    sorted_y = run_y[order]
    group_start = np.ones(len(order), dtype=bool)
    group_start[1:] = sorted_y[1:] != sorted_y[:-1]
    group = np.cumsum(group_start) - 1
    group_size = np.bincount(group, weights=run_size[order])
    group_rank = np.cumsum(group_size) - (group_size - 1) / 2 - mid
    spearman = float(group_rank[group] @ run_x_rank[order]) / np.sqrt(
        float(per_position @ x_rank**2) * float(group_size @ group_rank**2)
    )
    return slope, y_mean - slope * x_mean, float(sxy / np.sqrt(sxx * syy)), spearman, n


def fit(X, *, n_cells: int = DEFAULT_N_CELLS, random_state: int = 0, log1p_base: float | None = None) -> RankFit:
    """Fit the rank → expression line on a seeded sample of ``n_cells`` cells of ``X``."""
    cells = sample_cells(X.shape[0], n_cells, random_state)
    log_expression, n_ranked, kind, target_sum = _sample(X, cells, log1p_base=log1p_base)
    if not np.isfinite(log_expression).all():  # padding holds zeros
        msg = (
            "The rank → expression fit is not finite: the expression values are too large to normalise. Check the "
            "input, or pass `rank_fit=False`."
        )
        raise ValueError(msg)
    expressing = n_ranked > 0  # each row is sorted, so its first and last ranked values bound it
    if (
        n_ranked.sum() < 3
        or n_ranked.max(initial=0) < 2
        or (log_expression[expressing, 0].max() == log_expression[expressing, n_ranked[expressing] - 1].min())
    ):
        msg = (
            "Too few expressed genes, or expressed values all equal, to fit the rank → expression model; pass "
            "`rank_fit=False`."
        )
        raise ValueError(msg)
    slope, intercept, pearson, spearman, n_points = _statistics(log_expression, n_ranked)
    return RankFit(
        slope=float(slope),
        intercept=float(intercept),
        r2=pearson**2,
        pearson_r=pearson,
        spearman_rho=spearman,
        n_cells=len(cells),
        n_points=n_points,
        input=kind,
        target_sum=target_sum,
    )
