from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib import pyplot as plt

from sc_c2s._docs import doc_mod, doc_params, doc_show_ax
from sc_c2s._utils._validate import check_positive_int
from sc_c2s.tl._score_perturbation import cells, contrast

from ._utils import finish

if TYPE_CHECKING:
    from collections.abc import Hashable

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from mudata import MuData

#: Marker and colour of what is compared with the real perturbed cells.
_STYLE = {
    "predicted": ("o", "tab:red"),
    "mean_shift": ("s", "tab:blue"),
    "unchanged": ("^", "tab:grey"),
}


@doc_params(doc_mod=doc_mod, doc_show_ax=doc_show_ax)
def perturbation(
    real: AnnData | MuData,
    predicted: AnnData,
    *,
    condition_key: str,
    control: str,
    groupby: str,
    group: Hashable,
    perturbation: Hashable | None = None,
    n_top_genes: int = 20,
    label_genes: int = 10,
    n_genes: int | None = None,
    mod: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Plot predicted against real mean expression of a group's top DE genes, with the two baselines.

    Each of the `n_top_genes` genes most differentially expressed between the group's real perturbed and control
    cells (largest ``|t|`` of Welch's t-test) is drawn three times at its real perturbed mean (x): at the mean of
    the predicted cells, of the control cells (*unchanged*), and of the control cells shifted by the other groups'
    average response (*mean shift*) (y), on the scale of :func:`sc_c2s.tl.score_perturbation`. Points on the
    diagonal are exact; the `label_genes` genes of largest ``|t|`` are named at their predicted point.

    Parameters
    ----------
    real
        Real cells of every group, control and perturbed, that went through :func:`sc_c2s.pp.to_sentences`.
    predicted
        Cells from :func:`sc_c2s.tl.predict_perturbation`.
    condition_key
        Column of ``obs`` (of both) with the condition.
    control
        The value of ``obs[condition_key]`` of the real control cells.
    groupby
        Column of ``obs`` (of both) with the groups.
    group
        The group to plot, a value of ``obs[groupby]``; it needs at least two real perturbed and two real control
        cells.
    perturbation
        The perturbation to plot; ``None``: the predicted cells' only one. Groups and perturbations are compared
        as strings, as `control`, so ``group=1`` finds the group ``1`` of an integer column.
    n_top_genes
        Top DE genes to draw.
    label_genes
        Of those, how many to name (a non-negative integer; ``0`` names none, more than `n_top_genes` names all).
    n_genes
        Genes per real sentence; ``None`` takes the `n_genes` of the prediction.
    {doc_mod}
    {doc_show_ax}

    Returns
    -------
    The axes (or the figure if `return_fig`), or ``None`` if the plot was shown.

    Examples
    --------
    With `adata` and `predicted` as in the example of :func:`sc_c2s.tl.predict_perturbation`:

    >>> import sc_c2s
    >>> ax = sc_c2s.pl.perturbation(
    ...     adata, predicted, condition_key="condition", control="control", groupby="cell_type", group="B", show=False
    ... )  # doctest: +SKIP
    """
    check_positive_int(n_top_genes, "n_top_genes")
    if not isinstance(label_genes, int | np.integer) or isinstance(label_genes, bool) or label_genes < 0:
        msg = (
            f"`label_genes` (how many of the top DE genes to name) must be a non-negative integer, got {label_genes!r}."
        )
        raise ValueError(msg)
    data = cells(
        real, predicted, condition_key=condition_key, control=control, groupby=groupby, n_genes=n_genes, mod=mod
    )
    if perturbation is None:
        found = sorted(set(data.predicted_conditions))
        if len(found) != 1:
            msg = f"The predicted cells hold the perturbations {found}; pick one with `perturbation=`."
            raise ValueError(msg)
        perturbation = found[0]
    selected = (data.predicted_groups == str(group)) & (data.predicted_conditions == str(perturbation))
    if not selected.any():
        msg = (
            f"No predicted cell of group {group!r} and perturbation {perturbation!r}; groups: "
            f"{sorted(set(data.predicted_groups))}, perturbations: {sorted(set(data.predicted_conditions))}."
        )
        raise ValueError(msg)
    top = contrast(data, group=str(group), perturbation=str(perturbation)).top(n_top_genes)

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 5))
    for source, (marker, color) in _STYLE.items():
        label = source.replace("_", " ")
        ax.scatter(top["real"], top[source], marker=marker, color=color, s=24, alpha=0.8, label=label)
    for gene, row in top.iloc[:label_genes].iterrows():
        ax.annotate(gene, (row["real"], row["predicted"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    values = top[list(_STYLE)].to_numpy()
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    ax.plot([low, high], [low, high], color="black", lw=0.8, ls="--", zorder=0)
    ax.set_xlabel(f"real {perturbation} mean")
    ax.set_ylabel("predicted / baseline mean")
    ax.set_title(f"{group}: top {len(top)} DE genes")
    ax.legend(loc="upper left", frameon=False)
    return finish(ax, show=show, return_fig=return_fig)
