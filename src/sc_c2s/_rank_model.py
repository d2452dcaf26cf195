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
from scipy import sparse, stats

from ._utils._validate import check_number
from .pp._rank import rank_genes

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
    values = values[values != 0]
    if values.size == 0 or float(values.max()) > _LOG_MAX:
        return False
    sample = values[:: max(1, values.size // _LOG_SAMPLE)]
    return not np.array_equal(sample, np.round(sample))


def rank_points(
    X, cells: np.ndarray, *, random_state: int, log1p_base: float | None = None
) -> tuple[np.ndarray, np.ndarray, str, float]:
    """Points of the fit for the given cells: ``log10(1 + rank0)`` and ``log10(1 + normalised expression)``.

    Works on a copy of the sampled rows; ``X`` is not modified. Genes are ranked on the values as stored (log or
    not, the order is the same), so float32 input takes the fast path of the ranking kernels.

    Returns
    -------
    ``(log_rank, log_expression, input, target_sum)``.
    """
    rows = X[cells]
    if rows.dtype.kind == "b" or rows.dtype == np.float16:  # types scipy.sparse does not hold, or sums badly
        rows = rows.astype(np.float32)
    rows = sparse.csr_matrix(rows)
    kind = "log1p" if is_log_transformed(rows.data) else "linear"
    linear = sparse.csr_matrix((_linear(rows.data, kind, log1p_base), rows.indices, rows.indptr), shape=rows.shape)
    totals = np.asarray(linear.sum(axis=1)).ravel()
    target_sum = float(np.median(totals[totals > 0])) if np.any(totals > 0) else 1.0
    ranking = rank_genes(rows, n_genes=MAX_RANK, random_state=random_state, cells=cells, with_values=True)
    expressed = ranking.genes >= 0
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    log_expression = np.log10(1 + _linear(ranking.values, kind, log1p_base) * scale[:, None])[expressed]
    log_rank = np.log10(1 + np.broadcast_to(np.arange(ranking.genes.shape[1]), ranking.genes.shape))[expressed]
    return log_rank, log_expression, kind, target_sum


def _linear(values: np.ndarray, kind: str, log1p_base: float | None) -> np.ndarray:
    """Undo ``log1p`` (of base `log1p_base`, natural if ``None``) when `kind` is ``"log1p"``; float64."""
    values = np.asarray(values, dtype=np.float64)
    if kind == "linear":
        return values
    return np.expm1(values * np.log(log1p_base)) if log1p_base else np.expm1(values)


def fit(X, *, n_cells: int = DEFAULT_N_CELLS, random_state: int = 0, log1p_base: float | None = None) -> RankFit:
    """Fit the rank → expression line on a seeded sample of ``n_cells`` cells of ``X``."""
    cells = sample_cells(X.shape[0], n_cells, random_state)
    x, y, kind, target_sum = rank_points(X, cells, random_state=random_state, log1p_base=log1p_base)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        msg = (
            "Too few expressed genes, or expressed values all equal, to fit the rank → expression model; pass "
            "`rank_fit=False`."
        )
        raise ValueError(msg)
    slope, intercept = np.polyfit(x, y, 1)
    if not np.isfinite([slope, intercept]).all():
        msg = (
            "The rank → expression fit is not finite: the expression values are too large to normalise. Check the "
            "input, or pass `rank_fit=False`."
        )
        raise ValueError(msg)
    pearson = float(np.corrcoef(x, y)[0, 1])
    spearman = float(stats.spearmanr(x, y).statistic)
    return RankFit(
        slope=float(slope),
        intercept=float(intercept),
        r2=pearson**2,
        pearson_r=pearson,
        spearman_rho=spearman,
        n_cells=len(cells),
        n_points=int(x.size),
        input=kind,
        target_sum=target_sum,
    )
