"""sc_c2s.tl.score_generation and sc_c2s.pl.generation: generated cells against real ones."""

from __future__ import annotations

import math

import anndata as ad
import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from cycler import cycler
from matplotlib import pyplot as plt
from scipy import stats

import sc_c2s
from sc_c2s.tl import _score_generation

mpl.use("Agg")


@pytest.fixture(scope="module")
def halves(_cellbench) -> tuple[ad.AnnData, ad.AnnData]:
    """CellBench split at random into real cells and stand-in "generated" cells: the other half's sentences."""
    adata = _cellbench.copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=200)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    real, other = adata[order[:150]].copy(), adata[order[150:]].copy()
    fake = ad.AnnData(
        obs=pd.DataFrame(
            {
                "cell_type": other.obs["cell_type"].astype(str).to_numpy(),
                "c2s_sentence": other.obs["c2s_sentence"].to_numpy(),
            },
            index=[f"generated-{i}" for i in range(other.n_obs)],
        ),
        uns={"c2s_generate": {"params": {"n_genes": 200}}},  # as `generate` records it
    )
    return real, fake


def score(real, generated, **kwargs) -> pd.DataFrame:
    return sc_c2s.tl.score_generation(real, generated, label_key="cell_type", **kwargs)


def test_real_cells_score_like_the_control(halves):
    real, fake = halves
    scores = score(real, fake)

    assert scores.columns.tolist() == _score_generation.COLUMNS
    assert scores.index.tolist() == [*fake.obs["cell_type"].unique(), "overall"]
    assert scores.loc["overall", "n_real"] == real.n_obs
    assert scores.loc["overall", "n_generated"] == fake.n_obs
    overall = scores.loc["overall"]
    assert abs(overall["knn_recovery"] - overall["knn_recovery_control"]) < 0.15
    assert overall["pearson"] > overall["pearson_control"] - 0.03
    assert overall["mmd"] < 1.5 * overall["mmd_control"]
    assert overall["energy"] < 1.5 * overall["energy_control"]
    assert (scores["valid_rate"] == 1).all()
    assert (scores["duplicate_rate"] == 0).all()
    assert overall["sentence_length"] == pytest.approx(overall["sentence_length_real"], abs=5)


def test_copies_of_the_control_half_score_as_the_control(halves, monkeypatch):
    """Generated cells that are the control half's own sentences score exactly as the control on every figure: each
    figure compares both with the same reference half, in a space fitted on the reference halves only."""

    def alternate(cells, max_cells, rng):  # even positions the reference half, odd ones the control half
        cells = np.sort(cells)
        return cells[::2][:max_cells], cells[1::2][:max_cells]

    monkeypatch.setattr(_score_generation, "_split", alternate)
    real = halves[0]
    labels = real.obs["cell_type"].astype(str).to_numpy()
    control = np.concatenate([np.flatnonzero(labels == label)[1::2] for label in pd.unique(labels)])
    copies = ad.AnnData(
        obs=pd.DataFrame(
            {"cell_type": labels[control], "c2s_sentence": real.obs["c2s_sentence"].to_numpy()[control]},
            index=[f"generated-{i}" for i in range(len(control))],
        ),
        uns={"c2s_generate": {"params": {"n_genes": 200}}},
    )
    scores = score(real, copies)
    for metric in ["knn_recovery", "pearson", "mmd", "energy"]:
        np.testing.assert_allclose(scores[metric], scores[f"{metric}_control"], rtol=1e-5, err_msg=metric)
    assert (scores["pearson"] < 0.9999).all()  # the halves differ: a copy is not compared with itself


def test_overall_is_the_mean_over_types_and_the_space_is_fitted_on_the_reference_halves(halves, monkeypatch):
    real, generated = halves
    fitted = []
    pca = _score_generation.pca
    monkeypatch.setattr(_score_generation, "pca", lambda X, *args: fitted.append(X.shape[0]) or pca(X, *args))
    scores = score(real, generated)
    types = scores.drop(index="overall")
    assert len(types) == 5
    means = [c for c in scores.columns if c not in ("n_real", "n_generated")]
    np.testing.assert_allclose(scores.loc["overall", means].astype(float), types[means].mean(), rtol=1e-12)
    assert scores.loc["overall", "n_generated"] == types["n_generated"].sum() == generated.n_obs
    sizes = real.obs["cell_type"].value_counts()
    assert fitted == [sum((n + 1) // 2 for n in sizes if n >= _score_generation.MIN_REAL_CELLS)]


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data will no longer be the default")
def test_real_cells_read_back_from_zarr(halves, tmp_path):
    """zarr gives the gene list back as a NumPy StringDType array, which failed to cast to `str`."""
    pytest.importorskip("zarr", reason="zarr is optional for anndata 0.11")
    real, fake = halves
    real.write_zarr(tmp_path / "real.zarr")
    pd.testing.assert_frame_equal(score(ad.read_zarr(tmp_path / "real.zarr"), fake), score(real, fake))


def test_shuffled_labels_score_clearly_worse(halves):
    real, fake = halves
    shuffled = fake.copy()
    shuffled.obs["cell_type"] = np.random.default_rng(1).permutation(shuffled.obs["cell_type"].to_numpy())
    overall = score(real, shuffled).loc["overall"]
    assert overall["knn_recovery"] < 0.5 * overall["knn_recovery_control"]
    assert overall["mmd"] > 1.5 * overall["mmd_control"]
    assert overall["energy"] > 1.2 * overall["energy_control"]
    assert overall["pearson"] < overall["pearson_control"] - 0.03


def test_random_cells_score_clearly_worse(halves):
    real, fake = halves
    words = np.asarray(real.uns["c2s"]["genes"])
    rng = np.random.default_rng(2)
    noise = fake.copy()
    noise.obs["c2s_sentence"] = [" ".join(rng.choice(words, 200, replace=False)) for _ in range(noise.n_obs)]
    overall = score(real, noise).loc["overall"]
    assert overall["knn_recovery"] < 0.5 * overall["knn_recovery_control"]
    assert overall["pearson"] < 0.3
    assert overall["mmd"] > 2 * overall["mmd_control"]
    assert overall["energy"] > 1.5 * overall["energy_control"]


def test_one_generated_type_is_told_from_the_other_real_types(halves):
    """The classifier was fit on the generated types only: cells of another line generated as A549, alone, were
    all "recovered" as A549, and so was the control."""
    real, fake = halves
    wrong = fake[fake.obs["cell_type"] == "H1975"].copy()
    wrong.obs["cell_type"] = "A549"
    scores = score(real, wrong)
    assert scores.loc["A549", "knn_recovery"] < 0.1
    assert scores.loc["A549", "knn_recovery_control"] > 0.9
    right = score(real, fake[fake.obs["cell_type"] == "A549"].copy())
    assert right.loc["A549", "knn_recovery"] > 0.9


def test_real_cells_without_a_label_belong_to_no_type(halves):
    """Since every real type takes part in the classifier, cells without a label made a type "nan" of their own."""
    real, fake = halves
    real = real.copy()
    real.obs["cell_type"] = real.obs["cell_type"].astype(object)
    real.obs.loc[real.obs_names[::3], "cell_type"] = np.nan
    data = _score_generation.comparison(real, fake, label_key="cell_type")
    assert _score_generation._real_types(data) == ["A549", "H1975", "H2228", "H838", "HCC827"]
    scores = score(real, fake[fake.obs["cell_type"] == "A549"].copy())
    assert scores.loc["A549", "n_real"] == (real.obs["cell_type"] == "A549").sum()


def test_a_types_scores_do_not_depend_on_the_other_types_generated(halves):
    """One generator drew every type's halves in the order of the generated cells: adding a type, or putting it
    first, changed the reference cells of the others, and so their PCA space, classifier and scores."""
    real, fake = halves

    def of(*types):
        cells = ad.concat([fake[fake.obs["cell_type"] == t] for t in types], uns_merge="first")
        return score(real, cells).loc["A549"]

    alone = of("A549")
    pd.testing.assert_series_equal(of("A549", "H1975"), alone)
    pd.testing.assert_series_equal(of("H1975", "A549"), alone)


def test_cells_without_their_record_are_read_through_their_longest_sentence(halves):
    """Generated cells joined by `anndata.concat` lose `uns`: the real cells were read through 200 genes whatever
    the generated sentences' length, silently."""
    real, fake = halves
    short = fake.copy()
    lengths = [40] + [30] * (fake.n_obs - 1)
    short.obs["c2s_sentence"] = [
        " ".join(s.split()[:n]) for s, n in zip(fake.obs["c2s_sentence"], lengths, strict=True)
    ]
    expected = score(real, short, n_genes=40)
    joined = ad.concat([short[:100], short[100:]])
    assert not joined.uns
    with pytest.warns(UserWarning, match=r"real cells are read through 40 genes, as many as the longest written sen"):
        pd.testing.assert_frame_equal(score(real, joined), expected)
    assert expected.loc["overall", "sentence_length_real"] == 40
    assert score(real, short).loc["overall", "sentence_length_real"] == 200  # the record kept, as generate wrote it


def test_validity_rates_count_words(halves):
    real, fake = halves
    odd = fake[:4].copy()
    odd.obs["cell_type"] = "A549"
    # 3 valid genes, 1 unknown word and 1 repeat per cell: 5 words
    odd.obs["c2s_sentence"] = ["DPM1 CD99 NOTAGENE DPM1 LASP1."] * 4
    scores = score(real, odd)
    assert scores.loc["A549", "valid_rate"] == pytest.approx(3 / 5)
    assert scores.loc["A549", "duplicate_rate"] == pytest.approx(1 / 5)
    assert scores.loc["A549", "sentence_length"] == 5


def test_mmd_and_energy_match_hand_computed_values():
    x, y = np.array([[0.0]]), np.array([[1.0]])
    assert _score_generation.mmd(x, y, bandwidth=1.0) == pytest.approx(math.sqrt(2 - 2 * math.exp(-0.5)))
    assert _score_generation.mmd(x, x, bandwidth=1.0) == 0
    assert _score_generation._energy(x, y) == pytest.approx(math.sqrt(2))
    # in one dimension, the energy distance of scipy (the same V-statistic)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(1, 2, size=20)
    assert _score_generation._energy(a[:, None], b[:, None]) == pytest.approx(stats.energy_distance(a, b))


def test_knn_ties_go_to_the_nearest_neighbour():
    """sklearn's classifier gave a 2-2 tie to the label first in sorted order: "a" won every tie, whichever was nearer,
    which raised the recovery of types that sort first and lowered that of the others."""
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    cells = np.array([[0.0], [1.0], [2.5], [3.0], [10.0], [11.0], [12.0]])
    labels = np.array(["b", "a", "b", "a", "a", "a", "c"])
    codes, names = pd.factorize(labels)
    knn = NearestNeighbors(n_neighbors=4).fit(cells)
    points = np.array([[0.4], [2.4], [10.9]])  # tie, nearest "b" | tie, nearest "b" | no tie: "a" 3 to 1
    np.testing.assert_array_equal(_score_generation._vote(knn, codes, names, points), ["b", "b", "a"])
    sklearn = KNeighborsClassifier(n_neighbors=4).fit(cells, labels).predict(points)
    np.testing.assert_array_equal(sklearn, ["a", "a", "a"])  # what was used before


def test_generated_types_absent_from_real_are_left_out(halves):
    real, fake = halves
    extra = fake.copy()
    extra.obs["cell_type"] = extra.obs["cell_type"].astype(str)
    extra.obs.iloc[:3, extra.obs.columns.get_loc("cell_type")] = "T cell"
    with pytest.warns(UserWarning, match=r"no real cells \['T cell'\]"):
        scores = score(real, extra)
    assert "T cell" not in scores.index
    assert scores.loc["overall", "n_generated"] == fake.n_obs - 3


def test_errors(halves):
    real, fake = halves
    with pytest.raises(KeyError, match="label_key='nope'"):
        sc_c2s.tl.score_generation(real, fake, label_key="nope")
    with pytest.raises(KeyError, match="c2s_sentence"):
        score(real, ad.AnnData(obs=fake.obs[["cell_type"]]))
    read = sc_c2s.tl.from_sentences(
        fake.obs["c2s_sentence"], genes=real.var_names, rank_fit=real.uns["c2s"]["rank_fit"]
    )
    read.obs["cell_type"] = fake.obs["cell_type"]
    with pytest.raises(KeyError, match=r"from_sentences`, set their obs\['c2s_sentence'\] to the sentences"):
        score(real, read)
    read.obs["c2s_sentence"] = fake.obs["c2s_sentence"]
    assert score(real, read, n_genes=fake.uns["c2s_generate"]["params"]["n_genes"]).equals(score(real, fake))
    with pytest.raises(KeyError, match="generated_key"):
        score(real, fake, generated_key="label")
    other = fake.copy()
    other.obs["cell_type"] = "T cell"
    with pytest.raises(ValueError, match="No generated cell type"), pytest.warns(UserWarning):
        score(real, other)
    raw = real.copy()
    del raw.uns["c2s"]
    with pytest.raises(KeyError, match="to_sentences"):
        score(raw, fake)


def test_swapped_arguments(halves):
    """Generated cells passed first used to be told to run `to_sentences`."""
    real, fake = halves
    generated = fake.copy()
    generated.uns["c2s_generate"] = {"params": {"n_genes": 200}}
    for first in (fake, generated):
        with pytest.raises(ValueError, match=r"`real` looks like generated cells .*pass the real cells first"):
            score(first, real)
    with pytest.raises(ValueError, match=r"`real` looks like generated cells"):
        sc_c2s.pl.generation(fake, real, label_key="cell_type", show=False)


def test_mudata_real(halves, container):
    real, fake = halves
    scores = score(container.wrap(real.copy()), fake)
    pd.testing.assert_frame_equal(scores, score(real, fake))


@pytest.mark.parametrize("basis", ["pca", "umap"])
def test_plot_shows_real_and_generated(halves, basis):
    real, fake = halves
    ax = sc_c2s.pl.generation(real, fake, label_key="cell_type", basis=basis, show=False)
    n_points = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_points == real.n_obs + fake.n_obs
    labels = {text.get_text() for text in ax.get_legend().get_texts()}
    assert {"real (150)", "generated (150)", "A549"} <= labels
    assert ax.get_xlabel() == ("PC1" if basis == "pca" else "UMAP1")


def test_plot_errors(halves):
    real, fake = halves
    with pytest.raises(ValueError, match="basis"):
        sc_c2s.pl.generation(real, fake, label_key="cell_type", basis="tsne", show=False)
    with pytest.raises(KeyError, match="no colour"):
        sc_c2s.pl.generation(real, fake, label_key="cell_type", palette={"A549": "red"}, show=False)
    with pytest.raises(KeyError, match=r"no colour for \['"):
        sc_c2s.pl.generation(real, fake, label_key="cell_type", palette={}, show=False)
    for size in ("big", None, 0):  # matplotlib refused them with a figure made
        with pytest.raises((TypeError, ValueError), match=r"`size` must be"):
            sc_c2s.pl.generation(real, fake, label_key="cell_type", size=size, show=False)
    with pytest.raises(ValueError, match=r"span one principal component only \(2 cells × .* or `basis='umap'`"):
        sc_c2s.pl.generation(real[:2].copy(), fake, label_key="cell_type", show=False)  # failed in matplotlib
    assert plt.get_fignums() == []


def test_plot_palettes(halves):
    """A colormap name failed in matplotlib (the string was split into letters), as scanpy's `palette` reads it."""
    real, fake = halves
    types = list(real.obs["cell_type"].cat.categories)
    for palette, colors in [
        ("Set1", mpl.colormaps["Set1"](np.linspace(0, 1, len(types)))),
        (["red"], ["red"] * len(types)),
        (("#00ff00", "blue"), ["#00ff00", "blue"] * len(types)),
        (dict.fromkeys(types, "blue"), ["blue"] * len(types)),
        (mpl.colormaps["viridis"], mpl.colormaps["viridis"](np.linspace(0, 1, len(types)))),  # was not iterable
        (cycler(color=["red", "blue"]), ["red", "blue"] * len(types)),  # its values were taken for colours
        (np.array(["red", "blue"]), ["red", "blue"] * len(types)),
    ]:
        ax = sc_c2s.pl.generation(real, fake, label_key="cell_type", palette=palette, show=False)
        drawn = [c.get_facecolor()[0][:3] for c in ax.collections[::2]]  # the real cells of each type, in order
        np.testing.assert_allclose(drawn, [mpl.colors.to_rgb(c) for c in colors[: len(types)]], atol=0.5 / 255)


def _legend_colors(ax) -> dict[str, str]:
    """The colour of each cell type in the legend (after "real", "generated" and a gap), in its order."""
    return {h.get_label(): mpl.colors.to_hex(h.get_color()) for h in ax.get_legend().legend_handles[3:]}


def test_plot_colours_types_as_scanpy(halves):
    """Types were coloured in the order cells came in, so a type's colour changed with the cell order and did not
    match scanpy's plots of the same data, even with `palette=adata.uns["cell_type_colors"]`."""
    real, fake = halves
    shuffled = real[::-1].copy()
    shuffled.obsm["X_test"] = np.zeros((shuffled.n_obs, 2))
    scanpy_plotted = shuffled.copy()
    sc.pl.embedding(scanpy_plotted, basis="test", color="cell_type", show=False)
    scanpy_colors = dict(
        zip(shuffled.obs["cell_type"].cat.categories, scanpy_plotted.uns["cell_type_colors"], strict=True)
    )
    assert list(scanpy_colors.values()) == [mpl.colors.to_hex(f"C{i}") for i in range(5)]
    for data in (real, shuffled):
        assert _legend_colors(sc_c2s.pl.generation(data, fake, label_key="cell_type", show=False)) == scanpy_colors
    stored = ["#ff0000", "#00ff00", "#0000ff", "#000000", "#ffff00"]
    shuffled.uns["cell_type_colors"] = np.array(stored, dtype=object)
    expected = dict(zip(shuffled.obs["cell_type"].cat.categories, stored, strict=True))
    for palette in (None, stored):
        ax = sc_c2s.pl.generation(shuffled, fake, label_key="cell_type", palette=palette, show=False)
        assert _legend_colors(ax) == expected
    shuffled.uns["cell_type_colors"] = stored[:4]  # too few, as scanpy takes them: its defaults
    assert _legend_colors(sc_c2s.pl.generation(shuffled, fake, label_key="cell_type", show=False)) == scanpy_colors


def test_plot_types_only_generated_come_last(halves):
    real, fake = halves
    real = real.copy()
    real.uns["cell_type_colors"] = ["#ff0000", "#00ff00", "#0000ff", "#000000", "#ffff00"]
    fake = fake.copy()
    fake.obs["cell_type"] = pd.Categorical(fake.obs["cell_type"].replace("H838", "AAA new"))
    ax = sc_c2s.pl.generation(real, fake, label_key="cell_type", show=False)
    assert _legend_colors(ax) == {
        "A549": "#ff0000",
        "H1975": "#00ff00",
        "H2228": "#0000ff",
        "H838": "#000000",
        "HCC827": "#ffff00",
        "AAA new": mpl.colors.to_hex("C5"),
    }


def test_plot_draws_cells_without_a_type_in_grey(halves):
    """NaN labels were a cell type called 'nan'."""
    real, fake = halves
    real = real.copy()
    real.obs.loc[real.obs_names[:20], "cell_type"] = np.nan
    ax = sc_c2s.pl.generation(real, fake, label_key="cell_type", show=False)
    assert [t.get_text() for t in ax.get_legend().get_texts()][3:] == [
        "A549",
        "H1975",
        "H2228",
        "H838",
        "HCC827",
        "NA",
    ]
    assert _legend_colors(ax)["NA"] == mpl.colors.to_hex("lightgray")
    beneath_real, beneath_generated = ax.collections[:2]  # drawn first, as scanpy draws them
    assert (len(beneath_real.get_offsets()), len(beneath_generated.get_offsets())) == (20, 0)
    np.testing.assert_allclose(beneath_real.get_facecolor()[0][:3], mpl.colors.to_rgb("lightgray"))
    assert sum(len(c.get_offsets()) for c in ax.collections) == real.n_obs + fake.n_obs


@pytest.mark.parametrize(
    ("palette", "match"),
    [
        pytest.param([], "`palette` is empty", id="empty-list"),
        pytest.param((), "`palette` is empty", id="empty-tuple"),
        pytest.param(
            "Set99",
            r"`palette='Set99'` is not the name of a matplotlib colormap \(e\.g\. 'Set1', 'tab20'\)\.$",
            id="name",
        ),
        pytest.param(
            "red", r"is not the name of a matplotlib colormap .*; for one colour, pass a list: \['red'\]", id="colour"
        ),
        pytest.param(
            ["red", "notacolour"], r"not matplotlib colours: \{'\w+': 'notacolour', '\w+': 'notacolour'\}", id="list"
        ),
        pytest.param(
            {"A549": "red", "H1975": "red", "H2228": "nope", "HCC827": "red", "H838": "red"},
            r"not matplotlib colours: \{'H2228': 'nope'\}",
            id="mapping",
        ),
    ],
)
def test_plot_refuses_bad_palettes(halves, palette, match):
    """`palette=[]` used to fail with a ZeroDivisionError, a bad colour inside matplotlib."""
    real, fake = halves
    with pytest.raises(ValueError, match=match):
        sc_c2s.pl.generation(real, fake, label_key="cell_type", palette=palette, show=False)


def test_plot_refuses_palettes_of_another_kind(halves):
    """`palette=3` failed with "'int' object is not iterable", a cycler of markers on its values."""
    real, fake = halves
    with pytest.raises(TypeError, match=r"`palette` must be a colormap \(or its name\), a list or cycler .*; got int"):
        sc_c2s.pl.generation(real, fake, label_key="cell_type", palette=3, show=False)
    with pytest.raises(ValueError, match=r"`palette` is a cycler of \['marker'\], not of 'color'"):
        sc_c2s.pl.generation(real, fake, label_key="cell_type", palette=cycler(marker=["o"]), show=False)


def test_type_with_too_few_real_cells(halves):
    """A type with two real cells used to fail inside sklearn's PCA."""
    real, fake = halves
    a549 = np.flatnonzero(real.obs["cell_type"] == "A549")
    for n in (2, 3):
        few = real[a549[:n]].copy()
        with (
            pytest.warns(UserWarning, match=r"fewer than 4 \['A549'\]"),
            pytest.raises(ValueError, match="at least 4 cells"),
        ):
            score(few, fake[fake.obs["cell_type"] == "A549"].copy())
    scores = score(real[a549[:4]].copy(), fake[fake.obs["cell_type"] == "A549"].copy())
    assert scores.loc["A549", "n_real"] == 4
    assert np.isfinite(scores.loc["A549", ["mmd", "mmd_control", "energy", "energy_control"]].astype(float)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_cells": 0}, "`max_cells` must be a positive integer"),
        ({"max_cells": 1}, "`max_cells` must be at least 2, got 1"),
        ({"n_comps": 0}, "`n_comps` must be a positive integer"),
        ({"n_neighbors": 2.5}, "`n_neighbors` must be a positive integer"),
        ({"n_genes": 0}, "`n_genes` must be a positive integer or None"),
        ({"random_state": -1}, "`random_state` must be an integer"),
        ({"random_state": 2**32}, r"`random_state` must be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_bad_arguments(halves, kwargs, match):
    """`max_cells=0` used to fail inside sklearn with "Found array with 0 sample(s)", `max_cells=1` in the PCA."""
    real, fake = halves
    with pytest.raises(ValueError, match=match):
        score(real, fake, **kwargs)


def test_random_state_kinds(halves):
    real, fake = halves
    pd.testing.assert_frame_equal(
        score(real, fake, random_state=np.random.default_rng(3)),
        score(real, fake, random_state=np.random.default_rng(3)),
    )
    drawn = score(real, fake, random_state=None)
    # the seed drawn is recorded (it was not), and gives the same scores again
    pd.testing.assert_frame_equal(score(real, fake, random_state=drawn.attrs["random_state"]), drawn)


def test_generated_cells_without_a_shared_gene_are_an_error(halves):
    """Real cells that share no gene with the generated ones used to give scores with valid_rate 0."""
    real, fake = halves
    other = fake.copy()
    other.obs["c2s_sentence"] = ["NOTAGENE OTHERGENE"] * other.n_obs
    with pytest.raises(ValueError, match=r"None of the \d+ words of the generated sentences is a gene of the real"):
        score(real, other)
    other.obs["c2s_sentence"] = [""] * other.n_obs
    with pytest.raises(ValueError, match="hold no words"):
        score(real, other)
    unrecorded = other.copy()
    del unrecorded.uns["c2s_generate"]  # nor a warning before it about reading real cells through the longest of them
    with pytest.raises(ValueError, match="hold no words"):
        score(real, unrecorded)
    with pytest.raises(ValueError, match="is a gene of the real"):
        sc_c2s.pl.generation(real, _with(other, "NOTAGENE"), label_key="cell_type", show=False)


def test_generated_cells_mostly_of_other_genes_are_announced(halves, scanpy_log):
    """With half the words not genes of the real cells (cells of other data, or genes left out after ranking), the
    scores compared other genes than the cells were generated over, without a word."""
    real, fake = halves
    score(real, fake)
    assert "not genes of the real cells" not in scanpy_log.getvalue()
    other = fake.copy()
    other.obs["c2s_sentence"] = [f"{s.split()[0]} NOTAGENE OTHERGENE" for s in fake.obs["c2s_sentence"]]
    score(real, other)
    assert "67% of the words of the generated sentences are not genes of the real cells" in scanpy_log.getvalue()


def _with(generated: ad.AnnData, sentence: str) -> ad.AnnData:
    generated = generated.copy()
    generated.obs["c2s_sentence"] = sentence
    return generated
