from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib import pyplot as plt

from sc_c2s import _rank_model
from sc_c2s._data import DataHandler, Matrix
from sc_c2s._docs import doc_adata, doc_mod, doc_params, doc_show_ax
from sc_c2s._utils._validate import check_positive_int, check_rank_fit

from ._utils import finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from mudata import MuData

#: The end of the error for data that is no longer expression.
_CHANGED = (
    "It changed since `sc_c2s.pp.to_sentences` ranked it, so the points of the fit cannot be drawn from it: restore "
    "the data, or run `sc_c2s.pp.to_sentences` again."
)
#: Relative change of the cells' median total below which the points are drawn as the fit's (a scale change of 1 %
#: moves them by 0.004 in log10).
_SAME_SCALE = 0.01


@doc_params(doc_adata=doc_adata, doc_mod=doc_mod, doc_show_ax=doc_show_ax)
def rank_fit(
    adata: AnnData | MuData,
    *,
    mod: str | None = None,
    gridsize: int = 60,
    cmap: str | Colormap = "viridis",
    line_color: str = "crimson",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Plot expression against rank with the fitted rank → expression line.

    A hexbin density of ``log10(1 + normalised expression)`` against ``log10(1 + rank0)`` over the cells sampled
    for the fit by :func:`sc_c2s.pp.to_sentences`, with the fitted line, its slope, intercept and R². If the data
    no longer gives the fit's points (cells subset, normalised or changed since), a warning says so and the title
    names the cells drawn.
    A good fit (R² about 0.8 on the published immune data, 0.91 on ``pbmc68k_reduced``) means generated sentences
    translate back into realistic expression.

    Parameters
    ----------
    {doc_adata}
    {doc_mod}
    gridsize
        Number of hexagons across the x axis.
    cmap
        Colour map of the point density (log scale): a name or a :class:`~matplotlib.colors.Colormap`.
    line_color
        Colour of the fitted line.
    {doc_show_ax}

    Returns
    -------
    The axes (or the figure if `return_fig`), or ``None`` if the plot was shown.

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)
    >>> ax = sc_c2s.pl.rank_fit(adata, show=False)
    """
    if check_positive_int(gridsize, "gridsize") < 2:  # matplotlib divides by zero for 1
        msg = f"`gridsize` must be at least 2 hexagons across, got {gridsize}."
        raise ValueError(msg)
    # bad colours raise here, before a figure is left open
    colormap = matplotlib.colormaps.get_cmap(cmap)
    if not matplotlib.colors.is_color_like(line_color):
        msg = f"`line_color` must be a matplotlib colour (e.g. 'red', '#d62728'), got {line_color!r}."
        raise ValueError(msg)
    handler = DataHandler(adata, mod)
    c2s = handler.c2s()
    fit = _rank_model.RankFit.from_dict(check_rank_fit(c2s))
    params = c2s["params"]
    matrix = _ranked_matrix(handler, params)
    cells = _rank_model.sample_cells(handler.n_obs, fit.n_cells, params.get("random_state", 0))
    x, y, _, target_sum = _rank_model.rank_points(
        matrix.X, cells, log1p_base=matrix.log1p_base, source=matrix.source, fix=_CHANGED
    )
    if not len(x):
        msg = f"`{matrix.source}` holds no value above 0 in the {len(cells)} cells the fit was drawn from. {_CHANGED}"
        raise ValueError(msg)
    title = f"Rank → expression fit ({fit.n_cells} cells)"
    changes = []
    if (len(cells), len(x)) != (fit.n_cells, fit.n_points):
        changes.append(
            f"it was made on {fit.n_cells} cells ({fit.n_points:,} points), the data now gives {len(cells)} cells "
            f"({len(x):,} points)"
        )
    # normalised since (log-transforming alone gives the same points): the points move off the line
    if np.isfinite(fit.target_sum) and not np.isclose(target_sum, fit.target_sum, rtol=_SAME_SCALE):
        changes.append(
            f"the fit's cells summed to a median of {fit.target_sum:.4g}, the data's now sum to {target_sum:.4g}"
        )
    if changes:
        warnings.warn(
            f"The points drawn are not the fit's: {'; '.join(changes)}, so it was subset or changed since "
            "`sc_c2s.pp.to_sentences`. The line and its figures are the fit's; run `sc_c2s.pp.to_sentences` again "
            "to fit the data as it is.",
            UserWarning,
            stacklevel=2,
        )
        title += f"\npoints: {len(cells)} cells of the changed data"

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    hexbin = ax.hexbin(x, y, gridsize=gridsize, bins="log", mincnt=1, cmap=colormap, linewidths=0)
    ax.figure.colorbar(hexbin, ax=ax, label="genes × cells")
    line_x = np.linspace(0, x.max(), 100)  # over the ranks the data reach
    ax.plot(line_x, fit.intercept + fit.slope * line_x, color=line_color, lw=2)
    ax.text(
        0.97,
        0.97,
        f"slope {fit.slope:.3f}\nintercept {fit.intercept:.3f}\n$R^2$ {fit.r2:.3f}",
        transform=ax.transAxes,
        ha="right",
        va="top",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )
    ax.set_xlabel("log10(1 + rank)")
    ax.set_ylabel("log10(1 + normalised expression)")
    ax.set_title(title)
    return finish(ax, show=show, return_fig=return_fig)


def _ranked_matrix(handler: DataHandler, params: dict) -> Matrix:
    """Return the matrix :func:`sc_c2s.pp.to_sentences` ranked, or raise an error saying that it is gone."""
    layer, use_raw = params.get("layer"), bool(params.get("use_raw", False))
    try:
        return handler.matrix(layer=layer, use_raw=use_raw)
    except (KeyError, ValueError) as error:
        what = "`.raw`" if use_raw else f"`layers[{layer!r}]`" if layer is not None else "`X`"
        msg = (
            f"`sc_c2s.pp.to_sentences` ranked {what}, which the data no longer holds, so the points of the fit cannot "
            "be drawn: restore it, or run `sc_c2s.pp.to_sentences` again."
        )
        raise ValueError(msg) from error
