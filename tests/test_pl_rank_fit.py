"""`sc_c2s.pl.rank_fit`: the density, the fitted line and its figures."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scanpy as sc
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from scipy import sparse

import sc_c2s
from sc_c2s import _rank_model


def test_draws_density_line_and_figures(container, cellbench):
    data = container.wrap(cellbench)
    sc_c2s.pp.to_sentences(data, gene_symbols="gene_symbol")
    fit = container.rna(data).uns["c2s"]["rank_fit"]
    ax = sc_c2s.pl.rank_fit(data, show=False)

    assert isinstance(ax, Axes)
    hexbins = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(hexbins) == 1
    assert hexbins[0].get_array().sum() == fit["n_points"]  # every point of the fit is in the density
    (line,) = ax.get_lines()
    x, y = line.get_data()
    np.testing.assert_allclose(y, fit["intercept"] + fit["slope"] * x)
    assert x[0] == 0
    assert x[-1] == pytest.approx(np.log10(_rank_model.MAX_RANK))  # cellbench cells have ≥ 999 genes
    (text,) = ax.texts
    assert text.get_text() == f"slope {fit['slope']:.3f}\nintercept {fit['intercept']:.3f}\n$R^2$ {fit['r2']:.3f}"
    assert ax.get_xlabel() == "log10(1 + rank)"
    assert "300 cells" in ax.get_title()
    assert len(ax.figure.axes) == 2  # with a colour bar


def test_line_stops_where_the_data_stop(pbmc68k):
    sc_c2s.pp.to_sentences(pbmc68k)
    ax = sc_c2s.pl.rank_fit(pbmc68k, show=False)
    longest = int(np.diff(pbmc68k.raw.X.indptr).max())
    assert ax.get_lines()[0].get_data()[0][-1] == pytest.approx(np.log10(longest))


def test_given_axes_and_return_fig(pbmc4k):
    sc_c2s.pp.to_sentences(pbmc4k, rank_fit=100)
    fig, (ax1, ax2) = plt.subplots(1, 2)
    assert sc_c2s.pl.rank_fit(pbmc4k, ax=ax2, show=False) is ax2
    assert len(ax2.get_lines()) == 1
    assert not ax1.has_data()
    assert sc_c2s.pl.rank_fit(pbmc4k, ax=ax1, return_fig=True) is fig
    assert isinstance(fig, Figure)


def test_return_fig_from_a_subfigure(pbmc4k):
    """Axes in a subfigure returned the subfigure, which has no `savefig`."""
    sc_c2s.pp.to_sentences(pbmc4k, rank_fit=100)
    fig = plt.figure()
    ax = fig.subfigures(1, 2)[1].subplots()
    assert sc_c2s.pl.rank_fit(pbmc4k, ax=ax, return_fig=True) is fig


def test_show(monkeypatch, pbmc4k):
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(True))
    sc_c2s.pp.to_sentences(pbmc4k, rank_fit=50)
    assert sc_c2s.pl.rank_fit(pbmc4k, show=True) is None
    assert shown == [True]


def test_png(tmp_path, pbmc68k):
    sc_c2s.pp.to_sentences(pbmc68k)
    ax = sc_c2s.pl.rank_fit(pbmc68k, show=False)
    ax.figure.savefig(tmp_path / "rank_fit.png", dpi=60)
    assert (tmp_path / "rank_fit.png").stat().st_size > 5_000


def test_needs_sentences_and_a_fit(container, pbmc4k):
    data = container.wrap(pbmc4k)
    with pytest.raises(KeyError, match=r"No cell sentences found.*Run `sc_c2s.pp.to_sentences\(adata\)` first"):
        sc_c2s.pl.rank_fit(data, show=False)
    sc_c2s.pp.to_sentences(data, rank_fit=False)
    with pytest.raises(KeyError, match=r"No rank fit in `uns\['c2s'\]`"):
        sc_c2s.pl.rank_fit(data, show=False)


@pytest.mark.parametrize(
    ("gridsize", "match"),
    [(0, "a positive integer"), (-3, "a positive integer"), (2.5, "a positive integer"), (1, "at least 2 hexagons")],
)
def test_bad_gridsize(pbmc4k, gridsize, match):
    """A gridsize of 0 used to fail inside matplotlib's hexbin, and 1 with a ZeroDivisionError, leaving a figure."""
    sc_c2s.pp.to_sentences(pbmc4k)
    with pytest.raises(ValueError, match=rf"`gridsize` must be {match}"):
        sc_c2s.pl.rank_fit(pbmc4k, gridsize=gridsize, show=False)
    assert plt.get_fignums() == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cmap": "nope"}, "'nope' is not a valid value for cmap"),
        ({"line_color": "notacolor"}, r"`line_color` must be a matplotlib colour .*, got 'notacolor'"),
    ],
)
def test_a_bad_colour_leaves_no_figure_open(pbmc4k, kwargs, match):
    """The figure was made before matplotlib refused the name: a notebook then showed it empty."""
    sc_c2s.pp.to_sentences(pbmc4k)
    with pytest.raises(ValueError, match=match):
        sc_c2s.pl.rank_fit(pbmc4k, show=False, **kwargs)
    assert plt.get_fignums() == []


def test_data_changed_since_the_fit(pbmc68k):
    """The errors used to ask for `use_raw=` or `layer=`, which `pl.rank_fit` does not take, and to name `X` always."""
    sc_c2s.pp.to_sentences(pbmc68k)  # ranks `.raw`
    pbmc68k.raw.X.data *= -1
    with pytest.raises(sc_c2s.pp.NotExpressionError, match=r"^`raw.X` holds negative values") as error:
        sc_c2s.pl.rank_fit(pbmc68k, show=False)
    assert str(error.value).endswith(
        "It changed since `sc_c2s.pp.to_sentences` ranked it, so the points of the fit cannot be drawn from it: "
        "restore the data, or run `sc_c2s.pp.to_sentences` again."
    )
    del pbmc68k.raw
    with pytest.raises(
        ValueError, match=r"ranked `.raw`, which the data no longer holds.*run `sc_c2s.pp.to_sentences`"
    ):
        sc_c2s.pl.rank_fit(pbmc68k, show=False)


def test_scaled_since_the_fit(cellbench):
    sc_c2s.pp.to_sentences(cellbench, rank_fit=100)
    cellbench.X = cellbench.X.toarray() - 1
    with pytest.raises(sc_c2s.pp.NotExpressionError, match=r"^`X` holds negative values.*It changed since") as error:
        sc_c2s.pl.rank_fit(cellbench, show=False)
    assert "use_raw=" not in str(error.value)
    assert "layer=" not in str(error.value)


def test_subset_since_the_fit_warns(pbmc68k):
    """A subset used to be drawn silently under the title of the fit's 700 cells."""
    sc_c2s.pp.to_sentences(pbmc68k)
    subset = pbmc68k[:50].copy()
    with pytest.warns(UserWarning, match=r"The points drawn are not the fit's: it was made on 700 cells .* 50 cells"):
        ax = sc_c2s.pl.rank_fit(subset, show=False)
    assert ax.get_title() == "Rank → expression fit (700 cells)\npoints: 50 cells of the changed data"


def test_normalised_since_the_fit_warns(pbmc4k):
    """Counts normalised to 10,000 after ranking were drawn without a word, above the line fitted to them as they
    were (cells summing to a median of 910): the points counted the same, so nothing seemed changed."""
    sc_c2s.pp.to_sentences(pbmc4k)
    target_sum = pbmc4k.uns["c2s"]["rank_fit"]["target_sum"]
    logged = sc.pp.log1p(pbmc4k, copy=True)  # undone before drawing: the same points, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sc_c2s.pl.rank_fit(logged, show=False)
    sc.pp.normalize_total(pbmc4k, target_sum=1e4)
    sc.pp.log1p(pbmc4k)
    with pytest.warns(
        UserWarning,
        match=rf"^The points drawn are not the fit's: the fit's cells summed to a median of {target_sum:.4g}, the "
        r"data's now sum to 1e\+04, so it was subset or changed since",
    ):
        ax = sc_c2s.pl.rank_fit(pbmc4k, show=False)
    assert ax.get_title() == "Rank → expression fit (500 cells)\npoints: 500 cells of the changed data"


def test_emptied_since_the_fit(pbmc4k):
    """An all-zero matrix failed inside matplotlib with "Invalid vmin or vmax"."""
    sc_c2s.pp.to_sentences(pbmc4k, rank_fit=50)
    pbmc4k.X = sparse.csr_matrix(pbmc4k.shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^`X` holds no value above 0") as error:
        sc_c2s.pl.rank_fit(pbmc4k, show=False)
    assert str(error.value) == (
        "`X` holds no value above 0 in the 50 cells the fit was drawn from. It changed since `sc_c2s.pp.to_sentences` "
        "ranked it, so the points of the fit cannot be drawn from it: restore the data, or run "
        "`sc_c2s.pp.to_sentences` again."
    )
