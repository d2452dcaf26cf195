"""What every plotting function does last."""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib import pyplot as plt
from scanpy import settings

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def finish(ax: Axes, *, show: bool | None, return_fig: bool) -> Axes | Figure | None:
    """Return the figure or the axes, or show the plot and return ``None``, as scanpy's plots do."""
    if return_fig:  # the whole figure, also for axes inside a subfigure (which cannot be saved on its own)
        return ax.figure.figure
    if settings.autoshow if show is None else show:
        plt.show()
        return None
    return ax
