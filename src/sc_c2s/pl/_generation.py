from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.lines import Line2D

from sc_c2s import _keys
from sc_c2s._data import DataHandler
from sc_c2s._docs import doc_mod, doc_params, doc_seed, doc_show_ax
from sc_c2s._utils._validate import (
    LEGACY_SEED_LIMIT,
    AnyRandom,
    check_number,
    check_positive_int,
    check_random_state,
)
from sc_c2s.tl._score_generation import comparison, pca, project

from ._utils import finish

if TYPE_CHECKING:
    from anndata import AnnData
    from cycler import Cycler
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from mudata import MuData

#: Colour of cells without a type, scanpy's `na_color`.
NA_COLOR = "lightgray"


@doc_params(doc_mod=doc_mod, doc_show_ax=doc_show_ax, doc_seed=doc_seed)
def generation(
    real: AnnData | MuData,
    generated: AnnData,
    *,
    label_key: str,
    generated_key: str = _keys.GENERATED_CELL_TYPE,
    basis: Literal["pca", "umap"] = "pca",
    n_genes: int | None = None,
    n_comps: int = 50,
    palette: str | Colormap | Cycler | Sequence[str] | Mapping[str, str] | None = None,
    size: float = 12.0,
    random_state: AnyRandom = 0,
    mod: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Plot real and generated cells together, coloured by cell type.

    Both are put on the scale of :func:`sc_c2s.tl.score_generation`: sentences read back into expression with
    one rank fit. ``basis="pca"`` shows the first two principal components of the real cells, with the
    generated cells projected onto them; ``basis="umap"`` embeds both together with :func:`scanpy.tl.umap` on
    `n_comps` such components. Real cells are small dots, generated cells crosses of their type's colour, so
    generated cells that land among the real cells of their type are what a good model gives.

    Types are coloured as scanpy colours them: in the order of the categories of ``obs[label_key]`` (then the
    types only the generated cells have), with the colours scanpy's plots keep in ``uns[f"{{label_key}}_colors"]``.
    Cells without a type (NaN) are drawn beneath the others in light grey, as ``"NA"`` in the legend.

    Parameters
    ----------
    real
        Real cells that went through :func:`sc_c2s.pp.to_sentences`.
    generated
        Cells from :func:`sc_c2s.tl.generate`.
    label_key
        Column of the real cells' ``obs`` with their types.
    generated_key
        Column of the generated cells' ``obs`` with their types.
    basis
        ``"pca"`` or ``"umap"``.
    n_genes
        Genes per real sentence; ``None`` takes the `n_genes` of the generation.
    n_comps
        Principal components for the UMAP.
    palette
        Colours of the cell types, as scanpy's `palette`: a matplotlib colormap or its name (e.g. ``"Set1"``),
        sampled evenly over the types; a list of colours, or a :class:`~cycler.Cycler` of them, repeated when
        shorter than the types; or a mapping of each type to its colour. ``None`` takes the colours in the real
        cells' ``uns[f"{{label_key}}_colors"]`` if there is one for each category, else scanpy's default palette.
    size
        Marker size of the real cells; generated cells are drawn larger.
    random_state
        Seed of the PCA and the UMAP {doc_seed}; below ``2**32``, as scanpy takes it.
    {doc_mod}
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
    >>> generated = sc_c2s.tl.generate(adata, model="demo", cell_types={{"CD14+ Monocyte": 20, "CD19+ B": 20}})
    >>> ax = sc_c2s.pl.generation(adata, generated, label_key="bulk_labels", show=False)
    """
    if basis not in ("pca", "umap"):
        msg = f"`basis` must be 'pca' or 'umap', got {basis!r}."
        raise ValueError(msg)
    check_positive_int(n_comps, "n_comps")
    check_number(size, "size", low=0, low_open=True)
    random_state = check_random_state(random_state, limit=LEGACY_SEED_LIMIT)
    data = comparison(real, generated, label_key=label_key, generated_key=generated_key, n_genes=n_genes, mod=mod)
    mean, components = pca(data.real, 2 if basis == "pca" else n_comps, random_state)
    if basis == "pca" and len(components) < 2:
        msg = (
            f"The real cells span one principal component only ({data.real.shape[0]} cells × {data.real.shape[1]} "
            "genes): plot at least 3 cells that express at least 3 genes between them, or `basis='umap'`."
        )
        raise ValueError(msg)
    coords = np.vstack([project(data.real, mean, components), project(data.generated, mean, components)])
    if basis == "umap":
        coords = _umap(coords, random_state)
    n_real = data.real.shape[0]
    handler = DataHandler(real, mod)
    real_types, generated_types = handler.obs[label_key], generated.obs[generated_key]
    types = _types(real_types, generated_types)
    if palette is None:
        n_real_types = len(pd.Categorical(real_types).categories)
        palette = _stored_palette(handler.uns.get(f"{label_key}_colors"), types, n_real_types=n_real_types)
    colors = _colors(types, palette)
    real_na, generated_na = real_types.isna().to_numpy(), generated_types.isna().to_numpy()
    any_na = real_na.any() or generated_na.any()

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 5))
    type_handles = []
    if any_na:  # beneath the others, as scanpy draws them
        _scatter(ax, coords[:n_real][real_na], coords[n_real:][generated_na], color=NA_COLOR, size=size)
    for label, color in colors.items():
        real_rows = (data.real_labels == label) & ~real_na
        generated_rows = (data.generated_labels == label) & ~generated_na
        if real_rows.any() or generated_rows.any():
            _scatter(ax, coords[:n_real][real_rows], coords[n_real:][generated_rows], color=color, size=size)
            type_handles.append(Line2D([], [], ls="", marker="o", color=color, label=label))
    if any_na:
        type_handles.append(Line2D([], [], ls="", marker="o", color=NA_COLOR, label="NA"))
    origin_handles = [
        Line2D([], [], ls="", marker="o", color="grey", alpha=0.5, label=f"real ({n_real})"),
        Line2D([], [], ls="", marker="x", color="grey", label=f"generated ({data.generated.shape[0]})"),
    ]
    # one legend, so that `savefig(bbox_inches="tight")` keeps all of it
    gap = Line2D([], [], ls="", label=" ")
    ax.legend(handles=[*origin_handles, gap, *type_handles], loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    name = "PC" if basis == "pca" else "UMAP"
    ax.set_xlabel(f"{name}1")
    ax.set_ylabel(f"{name}2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Real and generated cells ({data.n_genes} genes per sentence)")
    return finish(ax, show=show, return_fig=return_fig)


def _scatter(ax: Axes, real: np.ndarray, generated: np.ndarray, *, color: str, size: float) -> None:
    """Draw real cells as dots and generated ones as crosses, of one colour."""
    ax.scatter(*real.T, s=size, color=color, alpha=0.5, linewidths=0, rasterized=True)
    ax.scatter(*generated.T, s=size * 3, color=color, marker="x", linewidths=1.2, rasterized=True)


def _types(real: pd.Series, generated: pd.Series) -> list[str]:
    """Return the cell types in scanpy's order: the real cells' categories, then those only generated cells have.

    A column that is not categorical has its distinct values, sorted, for categories, as scanpy reads it.
    """
    return list(dict.fromkeys(str(t) for column in (real, generated) for t in pd.Categorical(column).categories))


def _stored_palette(stored: object, types: list[str], *, n_real_types: int) -> list[str] | None:
    """Return the colours scanpy stored for the real cells' types, then the default's for the generated cells' own.

    ``None`` when there are none, fewer than the real cells' types, or some are not colours: then scanpy too sets
    its defaults.
    """
    from matplotlib.colors import is_color_like

    if isinstance(stored, str) or not isinstance(stored, Sequence | np.ndarray):
        return None
    stored = list(stored)[:n_real_types]
    if len(stored) < n_real_types or not all(map(is_color_like, stored)):
        return None
    return [*stored, *_default_palette(len(types))[n_real_types:]]


def _default_palette(n: int) -> list[str]:
    """Return scanpy's default colours for `n` categories, as :func:`scanpy.pl.embedding` sets them.

    They are matplotlib's colour cycle if it has enough colours, else scanpy's palettes of 20, 28 or 102, else grey.
    """
    from matplotlib import rcParams
    from scanpy.plotting import palettes

    cycle = rcParams["axes.prop_cycle"].by_key().get("color", [])
    for palette in (cycle, palettes.default_20, palettes.default_28, palettes.default_102):
        if len(palette) >= n:
            return list(palette[:n])
    return ["grey"] * n


def _umap(coords: np.ndarray, random_state: int) -> np.ndarray:
    """Embed the rows of `coords` with scanpy's UMAP and its defaults."""
    import scanpy as sc
    from anndata import AnnData

    embedding = AnnData(obsm={"X_pca": coords}, shape=(coords.shape[0], 0))
    sc.pp.neighbors(embedding, use_rep="X_pca", random_state=random_state)
    sc.tl.umap(embedding, random_state=random_state)
    return embedding.obsm["X_umap"]


def _colors(
    labels: list[str], palette: str | Colormap | Cycler | Sequence[str] | Mapping[str, str] | None
) -> dict[str, str]:
    """Pick a colour for each label as scanpy reads `palette`, or from scanpy's default palettes."""
    from cycler import Cycler
    from matplotlib import colormaps
    from matplotlib.colors import Colormap, is_color_like, to_hex

    if palette is None:
        palette = _default_palette(len(labels))
    elif isinstance(palette, str):
        if palette not in colormaps:
            one = f"; for one colour, pass a list: [{palette!r}]" if is_color_like(palette) else ""
            msg = f"`palette={palette!r}` is not the name of a matplotlib colormap (e.g. 'Set1', 'tab20'){one}."
            raise ValueError(msg)
        palette = colormaps[palette]
    if isinstance(palette, Colormap):
        palette = [to_hex(c) for c in palette(np.linspace(0, 1, len(labels)))]
    elif isinstance(palette, Cycler):
        if "color" not in palette.keys:
            msg = f"`palette` is a cycler of {sorted(palette.keys)}, not of 'color'; pass e.g. `cycler(color=[...])`."
            raise ValueError(msg)
        palette = palette.by_key()["color"]
    elif not isinstance(palette, Mapping | Sequence | np.ndarray):
        msg = (
            f"`palette` must be a colormap (or its name), a list or cycler of colours, or a mapping of cell type to "
            f"colour; got {type(palette).__name__}."
        )
        raise TypeError(msg)
    if isinstance(palette, Mapping):
        missing = [label for label in labels if label not in palette]
        if missing:
            msg = f"`palette` has no colour for {missing}."
            raise KeyError(msg)
        colors = {label: palette[label] for label in labels}
    else:
        palette = list(palette)
        if not palette:
            msg = "`palette` is empty; pass colours, a colormap name such as 'Set1', or None for scanpy's default."
            raise ValueError(msg)
        colors = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    bad = {label: c for label, c in colors.items() if not is_color_like(c)}
    if bad:
        msg = f"`palette` gives cell types values that are not matplotlib colours: {bad}."
        raise ValueError(msg)
    return colors
