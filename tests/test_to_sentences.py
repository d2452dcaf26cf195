"""`sc_c2s.pp.to_sentences` on hand-built matrices, the real fixtures and every container."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse, stats

import sc_c2s
from sc_c2s.pp._kernels import tie_key
from sc_c2s.pp._rank import NotExpressionError

GENES = ["CD3D", "CD8A", "IL7R", "MS4A1", "NKG7"]
HAND = np.array(
    [
        [0, 3, 1, 0, 2],
        [5, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [2, 2, 0, 2, 1],
    ]
)


def tie_order(genes: list[int], seed: int, cell: int) -> list[int]:
    """Equal-valued genes of a cell, in the order of the documented tie-break key (highest first)."""
    return sorted(genes, key=lambda g: tie_key(seed, cell, g), reverse=True)


def expected_hand(seed: int) -> list[str]:
    tied = [GENES[g] for g in tie_order([0, 1, 3], seed, 3)]
    return ["CD8A NKG7 IL7R", "CD3D", "", " ".join([*tied, "NKG7"])]


def as_format(X: np.ndarray, fmt: str):
    return {"dense": np.asarray, "csr": sparse.csr_matrix, "csc": sparse.csc_matrix}[fmt](X)


def hand_adata(fmt: str = "csr", dtype=np.float32) -> ad.AnnData:
    return ad.AnnData(as_format(HAND.astype(dtype), fmt), var=pd.DataFrame(index=GENES))


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32, np.float64])
def test_hand_built_sentences(container, fmt, dtype):
    data = container.wrap(hand_adata(fmt, dtype))
    sc_c2s.pp.to_sentences(data, rank_fit=False)
    adata = container.rna(data)

    assert adata.obs["c2s_sentence"].tolist() == expected_hand(0)
    genes = adata.obsm["c2s_genes"]
    assert genes.dtype == np.int32
    assert genes.shape == (4, 4)  # the longest sentence
    np.testing.assert_array_equal(genes[:3], [[1, 4, 2, -1], [0, -1, -1, -1], [-1, -1, -1, -1]])
    assert adata.uns["c2s"]["genes"].tolist() == GENES
    params = {"random_state": 0, "use_raw": False, "sentences": True, **({"mod": "rna"} if container.is_mudata else {})}
    assert adata.uns["c2s"]["params"] == params
    assert "rank_fit" not in adata.uns["c2s"]
    if container.is_mudata:
        assert data.obs["rna:c2s_sentence"].tolist() == expected_hand(0)


def test_ties_follow_the_seed():
    """Each seed orders the three tied genes of cell 3 by its own key; over a few seeds, several orders occur."""
    orders = set()
    for seed in range(8):
        adata = hand_adata()
        sc_c2s.pp.to_sentences(adata, rank_fit=False, random_state=seed)
        assert adata.obs["c2s_sentence"].tolist() == expected_hand(seed)
        orders.add(adata.obs["c2s_sentence"].iloc[3])
    assert len(orders) > 1


def test_names_beyond_ascii():
    """Words are written as UTF-8 bytes: names whose characters take several bytes come out whole."""
    names = ["IFN-γ", "CD8A", "TNF-α", "IL7R", "NKG7"]
    adata = ad.AnnData(sparse.csr_matrix(HAND.astype(np.float32)), var=pd.DataFrame(index=names))
    sc_c2s.pp.to_sentences(adata, rank_fit=False)
    assert adata.obs["c2s_sentence"].iloc[:2].tolist() == ["CD8A NKG7 TNF-α", "IFN-γ"]


def test_stored_zeros_are_never_ranked():
    X = sparse.csr_matrix(HAND.astype(np.float32))
    with_zeros = sparse.csr_matrix(
        (np.r_[0.0, 3, 1, 2, 5, 0, 0, 2, 2, 2, 1], [0, 1, 2, 4, 0, 1, 3, 0, 1, 3, 4], [0, 4, 5, 7, 11]), shape=(4, 5)
    )
    assert with_zeros.nnz == X.nnz + 3
    for M in [with_zeros, with_zeros.tocsc()]:
        adata = ad.AnnData(M, var=pd.DataFrame(index=GENES))
        sc_c2s.pp.to_sentences(adata, rank_fit=False)
        assert adata.obs["c2s_sentence"].tolist() == expected_hand(0)


def test_empty_cells_are_logged(scanpy_log):
    adata = hand_adata()
    sc_c2s.pp.to_sentences(adata, rank_fit=False)
    log = scanpy_log.getvalue()
    assert "1 cells express no gene; their sentences are empty" in log
    assert "'c2s_genes', adata.obsm" in log
    assert "'c2s_sentence', adata.obs" in log
    assert "'c2s', adata.uns" in log


def test_formats_agree_on_real_data(cellbench):
    """CSR, CSC and dense storage of a real matrix give identical sentences."""
    results = []
    for M in [cellbench.X, cellbench.X.tocsc(), cellbench.X.toarray(), cellbench.X.astype(np.int32).toarray()]:
        adata = ad.AnnData(M, var=cellbench.var)
        sc_c2s.pp.to_sentences(adata, n_genes=300, rank_fit=False, gene_symbols="gene_symbol")
        results.append(adata.obsm["c2s_genes"])
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_matches_numpy_reference_on_real_data(pbmc4k):
    """Full sentences of real counts, which hold many ties, equal a plain numpy ranking."""
    sc_c2s.pp.to_sentences(pbmc4k, rank_fit=False, random_state=3)
    X = pbmc4k.X.toarray()
    for cell in range(0, pbmc4k.n_obs, 25):
        genes = np.flatnonzero(X[cell])
        keys = np.array([tie_key(3, cell, g) for g in genes], dtype=np.uint64)
        expected = pbmc4k.var_names[genes[np.lexsort((~keys, -X[cell, genes]))]]
        assert pbmc4k.obs["c2s_sentence"].iloc[cell] == " ".join(expected)


def test_obsm_indexes_into_uns_genes(cellbench):
    sc_c2s.pp.to_sentences(cellbench, gene_symbols="gene_symbol", rank_fit=False)
    words = np.asarray(cellbench.uns["c2s"]["genes"])
    assert words.tolist() == cellbench.var["gene_symbol"].tolist()
    for i in [0, 150, 299]:
        row = cellbench.obsm["c2s_genes"][i]
        assert cellbench.obs["c2s_sentence"].iloc[i] == " ".join(words[row[row >= 0]])
        assert (row >= 0).sum() == cellbench.X[i].nnz
    assert cellbench.uns["c2s"]["params"]["gene_symbols"] == "gene_symbol"


def test_n_genes_truncates(container, cellbench):
    full = cellbench.copy()
    sc_c2s.pp.to_sentences(full, rank_fit=False)
    data = container.wrap(cellbench)
    sc_c2s.pp.to_sentences(data, n_genes=50, rank_fit=False)
    adata = container.rna(data)
    np.testing.assert_array_equal(adata.obsm["c2s_genes"], full.obsm["c2s_genes"][:, :50])
    assert all(
        " ".join(s.split()[:50]) == t for s, t in zip(full.obs["c2s_sentence"], adata.obs["c2s_sentence"], strict=True)
    )
    assert adata.uns["c2s"]["params"]["n_genes"] == 50


def test_n_genes_above_the_longest_sentence():
    adata = hand_adata()
    sc_c2s.pp.to_sentences(adata, n_genes=1000, rank_fit=False)
    assert adata.obsm["c2s_genes"].shape == (4, 5)  # min(n_genes, n_vars), as for a dask array
    assert (adata.obsm["c2s_genes"][:, 4] == -1).all()
    assert adata.obs["c2s_sentence"].tolist() == expected_hand(0)


def test_options_off(container, pbmc4k):
    data = container.wrap(pbmc4k)
    sc_c2s.pp.to_sentences(data, sentences=False, rank_fit=False)
    adata = container.rna(data)
    assert "c2s_sentence" not in adata.obs
    assert set(adata.uns["c2s"]) == {"params", "genes"}
    assert adata.obsm["c2s_genes"].shape[0] == pbmc4k.n_obs


def test_pbmc68k_uses_raw_by_default(container, pbmc68k, scanpy_log):
    data = container.wrap(pbmc68k)
    sc_c2s.pp.to_sentences(data, n_genes=200)
    adata = container.rna(data)
    assert adata.uns["c2s"]["params"]["use_raw"] is True
    assert "ranking genes per cell\n    using `raw.X`: 765 genes\n" in scanpy_log.getvalue()  # said, as scanpy does
    assert adata.obs["c2s_sentence"].iloc[0].split()[:3] == ["FTL", "CD74", "HLA-DPA1"]
    assert adata.uns["c2s"]["genes"].tolist() == pbmc68k.raw.var_names.tolist()
    expressed = np.diff(pbmc68k.raw.X.indptr)
    np.testing.assert_array_equal((adata.obsm["c2s_genes"] >= 0).sum(axis=1), np.minimum(expressed, 200))


def test_layer(container, pbmc4k):
    pbmc4k.layers["counts"] = pbmc4k.X.copy()
    expected = pbmc4k.copy()
    sc_c2s.pp.to_sentences(expected, rank_fit=False)
    sc.pp.normalize_total(pbmc4k)
    sc.pp.log1p(pbmc4k)
    data = container.wrap(pbmc4k)
    sc_c2s.pp.to_sentences(data, layer="counts", rank_fit=False)
    adata = container.rna(data)
    assert adata.uns["c2s"]["params"]["layer"] == "counts"
    pd.testing.assert_series_equal(adata.obs["c2s_sentence"], expected.obs["c2s_sentence"])


def test_normalised_and_counts_give_the_same_sentences(cellbench):
    counts = cellbench.copy()
    sc_c2s.pp.to_sentences(counts, rank_fit=False)
    sc.pp.normalize_total(cellbench, target_sum=1e4)
    sc.pp.log1p(cellbench)
    sc_c2s.pp.to_sentences(cellbench, rank_fit=False)
    np.testing.assert_array_equal(cellbench.obsm["c2s_genes"], counts.obsm["c2s_genes"])


def test_reproducible_and_seeded(pbmc4k):
    runs = {}
    for seed in [7, 7, 8]:
        adata = pbmc4k.copy()
        sc_c2s.pp.to_sentences(adata, rank_fit=False, random_state=seed)
        runs.setdefault(seed, []).append(adata.obsm["c2s_genes"])
    np.testing.assert_array_equal(runs[7][0], runs[7][1])
    a, b = runs[7][0], runs[8][0]
    assert not np.array_equal(a, b)
    X = pbmc4k.X.toarray()
    # different seeds only reorder genes of equal expression
    rows = np.arange(len(X))[:, None]
    np.testing.assert_array_equal(np.where(a >= 0, X[rows, a], 0), np.where(b >= 0, X[rows, b], 0))
    np.testing.assert_array_equal(np.sort(a, axis=1), np.sort(b, axis=1))


def test_data_is_not_modified(container, pbmc68k):
    pbmc68k.layers["scaled"] = pbmc68k.X.copy()
    before = pbmc68k.copy()
    data = container.wrap(pbmc68k)
    sc_c2s.pp.to_sentences(data)
    adata = container.rna(data)
    np.testing.assert_array_equal(adata.X, before.X)
    assert adata.X.dtype == before.X.dtype
    np.testing.assert_array_equal(adata.layers["scaled"], before.layers["scaled"])
    assert (adata.raw.X != before.raw.X).nnz == 0
    pd.testing.assert_frame_equal(adata.var, before.var)


def test_anndata_view(pbmc4k):
    view = pbmc4k[100:160, 500:]
    expected = view.copy()
    sc_c2s.pp.to_sentences(expected, n_genes=30)
    with pytest.warns(UserWarning, match=r"^Received a view of an AnnData\. Making a copy\.$") as record:
        sc_c2s.pp.to_sentences(view, n_genes=30)
    assert record[0].filename == __file__  # as scanpy's verbs warn: the results are not in pbmc4k
    assert not view.is_view
    np.testing.assert_array_equal(view.obsm["c2s_genes"], expected.obsm["c2s_genes"])
    pd.testing.assert_series_equal(view.obs["c2s_sentence"], expected.obs["c2s_sentence"])
    assert view.uns["c2s"]["rank_fit"] == expected.uns["c2s"]["rank_fit"]
    assert "c2s_genes" not in pbmc4k.obsm
    assert "c2s" not in pbmc4k.uns


def test_mudata_view(pbmc4k):
    with md.set_options(pull_on_update=False):
        mdata = md.MuData({"rna": pbmc4k})
    view = mdata[:40]
    expected = pbmc4k[:40].copy()
    sc_c2s.pp.to_sentences(expected, rank_fit=False)
    with pytest.warns(UserWarning, match=r"^Received a view of a MuData\. Making a copy\.$"):
        sc_c2s.pp.to_sentences(view, rank_fit=False)
    assert not view.is_view
    assert view.obs["rna:c2s_sentence"].tolist() == expected.obs["c2s_sentence"].tolist()
    assert "c2s_genes" not in mdata.mod["rna"].obsm


def test_mudata_modality_choice(pbmc4k):
    with md.set_options(pull_on_update=False):
        mdata = md.MuData({"gex": pbmc4k, "adt": ad.AnnData(np.ones((pbmc4k.n_obs, 2)), obs=pbmc4k.obs[[]])})
    with pytest.raises(KeyError, match=r"no modality 'rna'; pass `mod=` with one of \['gex', 'adt'\]"):
        sc_c2s.pp.to_sentences(mdata)
    sc_c2s.pp.to_sentences(mdata, mod="gex", rank_fit=False)
    assert "gex:c2s_sentence" in mdata.obs
    assert "c2s_genes" in mdata.mod["gex"].obsm
    assert "c2s_genes" not in mdata.mod["adt"].obsm


@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_backed(tmp_path, pbmc4k, dense):
    if dense:
        pbmc4k.X = pbmc4k.X.toarray()
    pbmc4k.write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    sc_c2s.pp.to_sentences(backed, n_genes=100)
    sc_c2s.pp.to_sentences(pbmc4k, n_genes=100)
    assert backed.isbacked
    np.testing.assert_array_equal(backed.obsm["c2s_genes"], pbmc4k.obsm["c2s_genes"])
    pd.testing.assert_series_equal(backed.obs["c2s_sentence"], pbmc4k.obs["c2s_sentence"])
    assert backed.uns["c2s"]["rank_fit"] == pytest.approx(pbmc4k.uns["c2s"]["rank_fit"])


def test_backed_copy(tmp_path, pbmc4k):
    pbmc4k.write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    result = sc_c2s.pp.to_sentences(backed, n_genes=10, rank_fit=False, copy=True)
    assert not result.isbacked
    assert "c2s_genes" in result.obsm
    assert "c2s_genes" not in backed.obsm


def test_backed_view(tmp_path, pbmc4k, monkeypatch):
    """A view of a backed AnnData used to be ranked in full before anndata refused to copy it into memory."""
    pbmc4k.write_h5ad(tmp_path / "x.h5ad")
    view = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")[:100]
    monkeypatch.setattr(sc_c2s.pp._to_sentences, "rank_genes", None)  # refused before any ranking
    with pytest.raises(ValueError, match=r"view of a backed AnnData.*`copy=True`.*`adata = adata.to_memory\(\)`"):
        sc_c2s.pp.to_sentences(view, n_genes=10)
    assert "c2s" not in view.uns
    monkeypatch.undo()
    result = sc_c2s.pp.to_sentences(view, n_genes=10, copy=True)
    expected = sc_c2s.pp.to_sentences(pbmc4k[:100], n_genes=10, copy=True)
    assert not result.isbacked
    np.testing.assert_array_equal(result.obsm["c2s_genes"], expected.obsm["c2s_genes"])
    assert result.uns["c2s"]["rank_fit"] == expected.uns["c2s"]["rank_fit"]


def test_copy(container, pbmc4k):
    expected = pbmc4k.copy()
    sc_c2s.pp.to_sentences(expected, n_genes=20)
    data = container.wrap(pbmc4k)
    result = sc_c2s.pp.to_sentences(data, n_genes=20, copy=True)
    assert type(result) is type(data)
    assert result is not data
    assert "c2s_genes" not in container.rna(data).obsm
    assert "c2s" not in container.rna(data).uns
    np.testing.assert_array_equal(container.rna(result).obsm["c2s_genes"], expected.obsm["c2s_genes"])
    assert sc_c2s.pp.to_sentences(data, n_genes=20) is None


def test_write_and_read_back(container, tmp_path, cellbench):
    data = container.wrap(cellbench)
    sc_c2s.pp.to_sentences(data, gene_symbols="gene_symbol", n_genes=100)
    if container.is_mudata:
        data.write(tmp_path / "x.h5mu")
        back = md.read_h5mu(tmp_path / "x.h5mu")
        assert back.obs["rna:c2s_sentence"].tolist() == data.obs["rna:c2s_sentence"].tolist()
    else:
        data.write_h5ad(tmp_path / "x.h5ad")
        back = ad.read_h5ad(tmp_path / "x.h5ad")
    adata, read = container.rna(data), container.rna(back)
    np.testing.assert_array_equal(read.obsm["c2s_genes"], adata.obsm["c2s_genes"])
    assert read.obs["c2s_sentence"].tolist() == adata.obs["c2s_sentence"].tolist()
    assert read.uns["c2s"]["genes"].tolist() == adata.uns["c2s"]["genes"].tolist()
    assert read.uns["c2s"]["params"] == adata.uns["c2s"]["params"]
    assert read.uns["c2s"]["rank_fit"] == adata.uns["c2s"]["rank_fit"]
    assert (
        sc_c2s.tl.from_sentences(
            read.obs["c2s_sentence"], genes=read.uns["c2s"]["genes"], rank_fit=read.uns["c2s"]["rank_fit"]
        )
        .obs["n_valid_genes"]
        .tolist()
        == (read.obsm["c2s_genes"] >= 0).sum(axis=1).tolist()
    )


# ---- the rank fit ----------------------------------------------------------------------------------------------


def independent_fit(normalised: np.ndarray) -> dict[str, float]:
    """Fit log10(1 + x) on log10(1 + rank0) over expressed genes with rank0 < 999, row by row in numpy."""
    xs, ys = [], []
    for row in normalised:
        values = np.sort(row[row > 0])[::-1][:999]
        xs.append(np.log10(1 + np.arange(len(values))))
        ys.append(np.log10(1 + values))
    x, y = np.concatenate(xs), np.concatenate(ys)
    slope, intercept = np.polyfit(x, y, 1)
    r = stats.pearsonr(x, y).statistic
    return {
        "slope": slope,
        "intercept": intercept,
        "r2": r**2,
        "pearson_r": r,
        "spearman_rho": stats.spearmanr(x, y).statistic,
        "n_points": len(x),
    }


def assert_fit(fit: dict, expected: dict, rtol: float = 1e-6) -> None:
    for key, value in expected.items():
        assert fit[key] == pytest.approx(value, rel=rtol), key


def test_rank_fit_on_counts(container, cellbench):
    reference = cellbench.copy()
    reference.X = reference.X.astype(np.float64)
    sc.pp.normalize_total(reference)  # to the median library size
    expected = independent_fit(reference.X.toarray())

    data = container.wrap(cellbench)
    sc_c2s.pp.to_sentences(data, n_genes=200)
    fit = container.rna(data).uns["c2s"]["rank_fit"]
    assert_fit(fit, expected)
    assert fit["n_cells"] == 300
    assert fit["input"] == "linear"
    assert fit["target_sum"] == np.median(np.asarray(cellbench.X.sum(axis=1)))
    # the real figures: a steep, tight line (C2S reports slope ≈ -0.68, R² ≈ 0.8 on immune data)
    assert -0.8 < fit["slope"] < -0.6
    assert fit["r2"] > 0.9


def test_rank_fit_on_log_normalised_raw(pbmc68k):
    """`pbmc68k_reduced().raw` is log-normalised: the fit undoes log1p instead of normalising the logs again."""
    counts = ad.AnnData(np.expm1(pbmc68k.raw.X.toarray().astype(np.float64)))
    sc.pp.normalize_total(counts)
    expected = independent_fit(counts.X)

    sc_c2s.pp.to_sentences(pbmc68k)
    fit = pbmc68k.uns["c2s"]["rank_fit"]
    assert fit["input"] == "log1p"
    assert_fit(fit, expected, rtol=1e-5)

    twice = ad.AnnData(pbmc68k.raw.X.astype(np.float64))
    sc.pp.normalize_total(twice)
    assert fit["intercept"] != pytest.approx(independent_fit(twice.X.toarray())["intercept"], rel=0.05)


@pytest.mark.parametrize("base", [None, 2.0])
def test_rank_fit_is_the_same_on_counts_and_log_normalised(cellbench, base):
    counts = cellbench.copy()
    sc_c2s.pp.to_sentences(counts)
    sc.pp.normalize_total(cellbench)
    sc.pp.log1p(cellbench, base=base)
    sc_c2s.pp.to_sentences(cellbench)
    fit = cellbench.uns["c2s"]["rank_fit"]
    assert fit["input"] == "log1p"
    assert_fit(fit, {k: counts.uns["c2s"]["rank_fit"][k] for k in ["slope", "intercept", "r2", "spearman_rho"]}, 1e-5)


def test_rank_fit_on_normalised_data_keeps_its_scale(cellbench):
    """Normalised input is linear; its library sizes are all the target sum, which sets the fit's scale."""
    counts = cellbench.copy()
    sc_c2s.pp.to_sentences(counts)
    sc.pp.normalize_total(cellbench)  # to the median: the same scale as the fit on counts
    sc_c2s.pp.to_sentences(cellbench)
    fit = cellbench.uns["c2s"]["rank_fit"]
    assert fit["input"] == "linear"
    assert_fit(fit, {k: counts.uns["c2s"]["rank_fit"][k] for k in ["slope", "intercept", "r2", "target_sum"]}, 1e-5)

    sc.pp.normalize_total(cellbench, target_sum=1e4)
    sc_c2s.pp.to_sentences(cellbench)
    fit = cellbench.uns["c2s"]["rank_fit"]
    assert fit["target_sum"] == pytest.approx(1e4)
    reference = cellbench.X.toarray().astype(np.float64)
    assert_fit(fit, independent_fit(reference * (1e4 / reference.sum(axis=1, keepdims=True))), 1e-5)


def test_rank_fit_sample(pbmc4k):
    sc_c2s.pp.to_sentences(pbmc4k, rank_fit=120, random_state=4)
    fit = pbmc4k.uns["c2s"]["rank_fit"]
    assert fit["n_cells"] == 120
    cells = np.sort(np.random.default_rng(4).choice(pbmc4k.n_obs, size=120, replace=False))
    reference = pbmc4k[cells].copy()
    reference.X = reference.X.astype(np.float64)
    sc.pp.normalize_total(reference)
    assert_fit(fit, independent_fit(reference.X.toarray()))


# ---- bad input -------------------------------------------------------------------------------------------------


def assert_untouched(adata: ad.AnnData, before: ad.AnnData) -> None:
    assert "c2s" not in adata.uns
    assert "c2s_genes" not in adata.obsm
    assert "c2s_sentence" not in adata.obs
    X, Y = adata.X, before.X
    np.testing.assert_array_equal(X.toarray() if sparse.issparse(X) else X, Y.toarray() if sparse.issparse(Y) else Y)


def test_scaled_data_is_refused(container, pbmc68k):
    before = pbmc68k.copy()
    data = container.wrap(pbmc68k)
    with pytest.raises(NotExpressionError, match=r"`X` holds negative values.*scaled") as error:
        sc_c2s.pp.to_sentences(data, use_raw=False)
    assert str(error.value).endswith(
        "Rank raw counts or normalised expression instead, if the data holds them: `.raw` (`use_raw=True`)."
    )
    assert "layer=" not in str(error.value)  # pbmc68k has no layer
    assert_untouched(container.rna(data), before)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_nan_is_refused(container, fmt):
    X = HAND.astype(np.float64)
    X[3, 2] = np.nan
    adata = ad.AnnData(as_format(X, fmt), var=pd.DataFrame(index=GENES))
    before = adata.copy()
    data = container.wrap(adata)
    with pytest.raises(ValueError, match=r"`X` holds NaN \(first in cell 3\)"):
        sc_c2s.pp.to_sentences(data)
    assert_untouched(container.rna(data), before)


def test_negative_in_a_layer_names_the_layer():
    adata = hand_adata()
    adata.layers["scaled"] = -adata.X
    with pytest.raises(ValueError, match=r"`layers\['scaled'\]` holds negative values") as error:
        sc_c2s.pp.to_sentences(adata, layer="scaled")
    assert str(error.value).endswith("if the data holds them: `X` (`use_raw=False` without `layer=`).")


@pytest.mark.parametrize(
    ("where", "fix"),
    [
        (
            "X",
            "The data holds no other matrix: store raw counts or normalised expression in a layer and pass `layer=`.",
        ),
        (
            "raw",
            "if the data holds them: `X` (`use_raw=False` without `layer=`) or `layers['counts']` (`layer='counts'`).",
        ),
    ],
    ids=["no_other_matrix", "raw_beside_x_and_a_layer"],
)
def test_not_expression_advice_names_only_what_exists(where, fix):
    """The advice used to ask for `use_raw=True` and `layer=` whatever the data held and the user had passed."""
    adata = ad.AnnData(-HAND.astype(np.float32), var=pd.DataFrame(index=GENES))
    if where == "raw":
        adata.raw = adata.copy()
        adata.X = HAND.astype(np.float32)
        adata.layers["counts"] = adata.X.copy()
    with pytest.raises(NotExpressionError, match=r"holds negative values") as error:
        sc_c2s.pp.to_sentences(adata, use_raw=where == "raw")
    assert str(error.value).endswith(fix)
    assert str(error.value).startswith("`raw.X`" if where == "raw" else "`X`")


@pytest.mark.parametrize(
    ("var", "kwargs", "error", "match"),
    [
        (
            pd.DataFrame(index=["A", "B", "A", "C", "D"]),
            {},
            ValueError,
            r"1 gene names in var_names occur more than once \(e\.g\. A\).*adata\.var_names_make_unique\(\)",
        ),
        (
            pd.DataFrame({"sym": ["A", "B", "B", "C", "C"]}, index=GENES),
            {"gene_symbols": "sym"},
            ValueError,
            r"2 gene names in var\['sym'\] occur more than once.*make_index_unique",
        ),
        (
            pd.DataFrame({"sym": ["A", None, "B", "C", "D"]}, index=GENES),
            {"gene_symbols": "sym"},
            ValueError,
            r"var\['sym'\] has 1 missing names",
        ),
        (
            pd.DataFrame(index=GENES),
            {"gene_symbols": "symbol"},
            KeyError,
            r"`gene_symbols='symbol'` is not a column of var",
        ),
        (
            pd.DataFrame(index=["A", "B C", "D", "E", "F"]),
            {},
            ValueError,
            r"1 gene names in var_names are empty or contain whitespace \(e\.g\. 'B C'\)",
        ),
        (
            pd.DataFrame({"sym": ["A", "", "B", "C", "D"]}, index=GENES),
            {"gene_symbols": "sym"},
            ValueError,
            r"are empty or contain whitespace",
        ),
        (
            pd.DataFrame({"sym": ["A", "B", "C\nD", "E", "F"]}, index=GENES),
            {"gene_symbols": "sym"},
            ValueError,
            r"1 gene names in var\['sym'\] are empty or contain whitespace \(e\.g\. 'C\\nD'\)",
        ),
    ],
    ids=["duplicated", "duplicated_symbols", "missing_symbols", "no_column", "space", "empty_name", "newline"],
)
def test_bad_gene_names(container, var, kwargs, error, match):
    with warnings.catch_warnings():
        # anndata's and mudata's own warnings about the duplicated names under test
        warnings.filterwarnings("ignore", "(Variable|var)_? ?names are not unique", UserWarning)
        adata = ad.AnnData(sparse.csr_matrix(HAND.astype(np.float32)), var=var)
        before = adata.copy()
        data = container.wrap(adata)
    with pytest.raises(error, match=match):
        sc_c2s.pp.to_sentences(data, **kwargs)
    assert_untouched(container.rna(data), before)


def test_case_collisions_warn(container):
    adata = ad.AnnData(sparse.csr_matrix(HAND.astype(np.float32)), var=pd.DataFrame(index=["CD3D", "Cd3d", *GENES[2:]]))
    data = container.wrap(adata)
    with pytest.warns(UserWarning, match=r"2 gene names in var_names differ only by case \(e\.g\. CD3D, Cd3d\)"):
        sc_c2s.pp.to_sentences(data, rank_fit=False)
    assert container.rna(data).obs["c2s_sentence"].iloc[1] == "CD3D"


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty_matrix(container, shape):
    data = container.wrap(ad.AnnData(sparse.csr_matrix(shape, dtype=np.float32)))
    with pytest.raises(ValueError, match=rf"`X` is empty \({shape[0]} cells × {shape[1]} genes\): nothing to rank"):
        sc_c2s.pp.to_sentences(data)


@pytest.mark.parametrize("n_genes", [0, -5, 2.5, "200", True])
def test_bad_n_genes(n_genes):
    adata = hand_adata()
    with pytest.raises(ValueError, match=r"`n_genes` must be a positive integer or None"):
        sc_c2s.pp.to_sentences(adata, n_genes=n_genes)
    assert "c2s" not in adata.uns


@pytest.mark.parametrize("rank_fit", [0, -1, 2.5, "all"])
def test_bad_rank_fit(rank_fit):
    adata = hand_adata()
    with pytest.raises(ValueError, match=r"`rank_fit` must be True, False or a positive number of cells"):
        sc_c2s.pp.to_sentences(adata, rank_fit=rank_fit)


@pytest.mark.parametrize("sentences", [1, "yes", np.array([True])])
def test_bad_sentences(sentences):
    """Any truthy value used to mean strings, recorded as given."""
    adata = hand_adata()
    with pytest.raises(ValueError, match=r"`sentences` must be True, False or None"):
        sc_c2s.pp.to_sentences(adata, sentences=sentences)
    assert "c2s" not in adata.uns


def test_layer_and_use_raw(pbmc68k):
    pbmc68k.layers["x"] = abs(pbmc68k.X)
    with pytest.raises(ValueError, match=r"Pass either `layer=` or `use_raw=True`, not both"):
        sc_c2s.pp.to_sentences(pbmc68k, layer="x", use_raw=True)
    sc_c2s.pp.to_sentences(pbmc68k, layer="x", rank_fit=False)  # use_raw=None with a layer: the layer
    assert pbmc68k.uns["c2s"]["params"] == {"layer": "x", "use_raw": False, "sentences": True, "random_state": 0}


def test_missing_layer_and_raw():
    adata = hand_adata()
    with pytest.raises(KeyError, match=r"No layer 'counts'; available layers: \[\]"):
        sc_c2s.pp.to_sentences(adata, layer="counts")
    with pytest.raises(ValueError, match=r"`use_raw=True` but the AnnData has no `.raw`"):
        sc_c2s.pp.to_sentences(adata, use_raw=True)


def test_not_a_container():
    with pytest.raises(TypeError, match=r"Expected an AnnData or MuData object, got ndarray"):
        sc_c2s.pp.to_sentences(HAND)


def test_nan_of_an_empty_cell_names_its_cause():
    """NaN used to be called "scaled or corrected", though it comes from normalising a cell with nothing (0/0)."""
    X = HAND.astype(np.float64)
    with np.errstate(invalid="ignore"):
        normalised = X / X.sum(axis=1, keepdims=True) * 1e4  # cell 2 expresses nothing: 0/0
    adata = ad.AnnData(normalised, var=pd.DataFrame(index=GENES))
    with pytest.raises(NotExpressionError) as error:
        sc_c2s.pp.to_sentences(adata)
    assert str(error.value) == (
        "`X` holds NaN (first in cell 2), so it is not expression data: NaN usually comes from 0/0, e.g. normalising "
        "a cell that expresses nothing; drop such cells with `sc.pp.filter_cells(adata, min_genes=1)` before "
        "normalising. The data holds no other matrix: store raw counts or normalised expression in a layer and pass "
        "`layer=`."
    )


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_infinite_values_are_refused(container, fmt):
    """+inf used to be ranked first and to give a rank fit of NaN, and `from_sentences` all-NaN expression."""
    X = HAND.astype(np.float32)
    X[3, 4] = np.inf
    adata = ad.AnnData(as_format(X, fmt), var=pd.DataFrame(index=GENES))
    before = adata.copy()
    data = container.wrap(adata)
    with pytest.raises(NotExpressionError, match=r"`X` holds infinite values \(first in cell 3\)"):
        sc_c2s.pp.to_sentences(data)
    assert_untouched(container.rna(data), before)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_duplicate_entries_are_summed_on_a_copy(fmt):
    """A matrix that stores a gene twice for a cell (valid scipy) used to put the gene twice in the sentence."""
    # cell 0: CD8A stored as 1 + 3 = 4, above NKG7's 2; cell 1: CD3D as 2 + 3
    rows, cols, vals = [0, 0, 0, 0, 1, 1], [1, 4, 1, 2, 0, 0], [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    X = sparse.coo_matrix((np.float32(vals), (rows, cols)), shape=(2, 5))
    stored = sparse.csr_matrix((X.data, X.col, [0, 4, 6]), shape=X.shape) if fmt == "csr" else X.tocsc(copy=True)
    if fmt == "csc":  # tocsc sums duplicates; build the duplicated CSC by hand
        order = np.lexsort((X.row, X.col))
        indptr = np.searchsorted(X.col[order], np.arange(6))
        stored = sparse.csc_matrix((X.data[order], X.row[order], indptr), shape=X.shape)
    assert not stored.has_canonical_format
    data_before, indices_before = stored.data.copy(), stored.indices.copy()
    adata = ad.AnnData(stored, var=pd.DataFrame(index=GENES))
    sc_c2s.pp.to_sentences(adata)
    assert adata.obs["c2s_sentence"].tolist() == ["CD8A NKG7 IL7R", "CD3D"]
    dense = ad.AnnData(X.toarray(), var=pd.DataFrame(index=GENES))
    sc_c2s.pp.to_sentences(dense)
    np.testing.assert_array_equal(adata.obsm["c2s_genes"], dense.obsm["c2s_genes"])
    assert adata.uns["c2s"]["rank_fit"] == pytest.approx(dense.uns["c2s"]["rank_fit"])  # 4 points, not 6
    np.testing.assert_array_equal(adata.X.data, data_before)  # the user's matrix keeps its duplicates
    np.testing.assert_array_equal(adata.X.indices, indices_before)


def test_unsorted_indices_without_duplicates_are_read_as_they_are():
    X = sparse.csr_matrix((np.float32([2, 3, 1]), [4, 1, 2], [0, 3, 3, 3, 3]), shape=(4, 5))
    assert not X.has_sorted_indices
    adata = ad.AnnData(X, var=pd.DataFrame(index=GENES))
    sc_c2s.pp.to_sentences(adata, rank_fit=False)
    assert adata.obs["c2s_sentence"].iloc[0] == "CD8A NKG7 IL7R"
    assert not adata.X.has_sorted_indices


def test_random_state_follows_scanpy(pbmc4k):
    """None, a Generator and a RandomState used to fail inside the ranking with TypeError."""
    seeded = pbmc4k.copy()
    sc_c2s.pp.to_sentences(seeded, random_state=123)
    for random_state, again in [
        (None, None),
        (np.random.default_rng(5), np.random.default_rng(5)),
        (np.random.RandomState(5), np.random.RandomState(5)),
    ]:
        first, second = pbmc4k.copy(), pbmc4k.copy()
        np.random.seed(1)
        sc_c2s.pp.to_sentences(first, random_state=random_state)
        seed = first.uns["c2s"]["params"]["random_state"]
        assert isinstance(seed, int)
        assert 0 <= seed < 2**63
        np.random.seed(1)
        sc_c2s.pp.to_sentences(second, random_state=again)
        np.testing.assert_array_equal(first.obsm["c2s_genes"], second.obsm["c2s_genes"])
        replay = pbmc4k.copy()
        sc_c2s.pp.to_sentences(replay, random_state=seed)  # the recorded seed makes the result again
        np.testing.assert_array_equal(first.obsm["c2s_genes"], replay.obsm["c2s_genes"])
        assert replay.uns["c2s"]["rank_fit"] == first.uns["c2s"]["rank_fit"]


@pytest.mark.parametrize("random_state", [-1, 2**63, 2**70, 1.5, "0", True])
def test_bad_random_state(random_state):
    """Negative and huge seeds used to fail with ValueError or OverflowError from inside numpy."""
    adata = hand_adata()
    with pytest.raises(ValueError, match=r"`random_state` must be an integer in \[0, 2\*\*63\), None, or a numpy"):
        sc_c2s.pp.to_sentences(adata, random_state=random_state)
    assert "c2s" not in adata.uns


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [
        (fmt, dtype)
        for fmt in ("dense", "csr")
        for dtype in (np.float16, np.int8, np.uint16, np.longdouble, np.bool_)
        if (fmt, dtype) != ("csr", np.float16)  # scipy.sparse holds no float16
    ],
)
def test_odd_numeric_dtypes(fmt, dtype, scanpy_log):
    """Dense float16 used to fail with scipy's "does not support dtype float16" in the rank fit, and longdouble in
    numba; booleans, which carry no order, were ranked silently, and fitted a line through their ties."""
    X = HAND > 0 if dtype == np.bool_ else HAND
    adata = ad.AnnData(as_format(X.astype(dtype), fmt), var=pd.DataFrame(index=GENES))
    reference = ad.AnnData(as_format(X.astype(np.float32), fmt), var=pd.DataFrame(index=GENES))
    if dtype == np.bool_:
        with pytest.raises(ValueError, match=r"Every cell's expressed values are equal \(binarised data\?\)"):
            sc_c2s.pp.to_sentences(adata)
    rank_fit = dtype != np.bool_
    sc_c2s.pp.to_sentences(adata, rank_fit=rank_fit)
    sc_c2s.pp.to_sentences(reference, rank_fit=rank_fit)
    np.testing.assert_array_equal(adata.obsm["c2s_genes"], reference.obsm["c2s_genes"])
    if rank_fit:
        fit = adata.uns["c2s"]["rank_fit"]
        assert np.isfinite([fit["slope"], fit["intercept"], fit["r2"]]).all()
    assert adata.X.dtype == dtype
    warned = "WARNING: `X` holds booleans (expressed or not): a cell's expressed genes all tie" in scanpy_log.getvalue()
    assert warned == (dtype == np.bool_)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i4"])
def test_big_endian_values(dtype, tmp_path):
    """HDF5 files written by other tools can hold big-endian values, which anndata reads as they are: numba's kernels
    failed with "Unsupported array dtype", in memory, backed and in dask chunks."""
    reference = ad.AnnData(HAND.astype(np.float32), var=pd.DataFrame(index=GENES))
    sc_c2s.pp.to_sentences(reference)
    adata = ad.AnnData(HAND.astype(dtype), var=pd.DataFrame(index=GENES))
    adata.write_h5ad(tmp_path / "big.h5ad")
    for data in (adata, ad.read_h5ad(tmp_path / "big.h5ad"), ad.read_h5ad(tmp_path / "big.h5ad", backed="r")):
        assert data.X.dtype == np.dtype(dtype)
        ranked = sc_c2s.pp.to_sentences(data, copy=True)
        np.testing.assert_array_equal(ranked.obsm["c2s_genes"], reference.obsm["c2s_genes"])
        assert ranked.uns["c2s"]["rank_fit"] == reference.uns["c2s"]["rank_fit"]
    da = pytest.importorskip("dask.array")
    lazy = ad.AnnData(da.from_array(HAND.astype(dtype), chunks=(2, -1)), var=pd.DataFrame(index=GENES))
    sc_c2s.pp.to_sentences(lazy, rank_fit=False)
    np.testing.assert_array_equal(np.asarray(lazy.obsm["c2s_genes"]), reference.obsm["c2s_genes"])


def test_numpy_booleans_are_flags():
    """``rank_fit=np.True_`` (a value read from a config array) was refused as no number of cells."""
    adata = hand_adata()
    sc_c2s.pp.to_sentences(adata, rank_fit=np.True_, sentences=np.False_)
    assert "rank_fit" in adata.uns["c2s"]
    assert "c2s_sentence" not in adata.obs
    sc_c2s.pp.to_sentences(adata, rank_fit=np.False_, sentences=np.True_)
    assert "rank_fit" not in adata.uns["c2s"]
    assert "c2s_sentence" in adata.obs


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3"])
def test_non_numeric_dtypes_are_refused(dtype):
    adata = ad.AnnData(HAND.astype(dtype), var=pd.DataFrame(index=GENES))
    with pytest.raises(TypeError, match=rf"`X` has dtype {np.dtype(dtype)}, but expression must be real numbers"):
        sc_c2s.pp.to_sentences(adata)
    assert "c2s" not in adata.uns


def test_x_none_names_the_layer():
    """With the data only in a layer and X None, this used to fail with AttributeError."""
    adata = hand_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = None
    with pytest.raises(ValueError, match=r"`X` is None.*pass `layer=`.*\['counts'\]"):
        sc_c2s.pp.to_sentences(adata)
    sc_c2s.pp.to_sentences(adata, layer="counts", rank_fit=False)
    assert adata.obs["c2s_sentence"].iloc[1] == "CD3D"


def test_rank_fit_of_equal_values_is_refused():
    """Found by tests/test_hostile_inputs.py: equal expressed values used to give a rank fit with R² NaN (numpy's
    "invalid value encountered in divide")."""
    adata = ad.AnnData(np.ones((2, 5), dtype=np.float32), var=pd.DataFrame(index=GENES))
    with pytest.raises(ValueError, match=r"expressed values all equal.*pass `rank_fit=False`"):
        sc_c2s.pp.to_sentences(adata)
    assert "c2s" not in adata.uns
    sc_c2s.pp.to_sentences(adata, rank_fit=False)


def test_rerun_without_sentences_removes_the_earlier_ones(container, scanpy_log):
    """The sentences of a first run used to stay in `obs` beside the `obsm` and `uns` of a second run."""
    data = container.wrap(hand_adata())
    sc_c2s.pp.to_sentences(data, rank_fit=False)
    copy = sc_c2s.pp.to_sentences(data, n_genes=2, sentences=False, rank_fit=False, copy=True)
    assert "c2s_sentence" in container.rna(data).obs  # the copy's run leaves `data` as it was
    sc_c2s.pp.to_sentences(data, n_genes=2, sentences=False, rank_fit=False)
    for result in (data, copy):
        adata = container.rna(result)
        assert "c2s_sentence" not in adata.obs
        assert adata.obsm["c2s_genes"].shape == (4, 2)
        if container.is_mudata:
            assert "rna:c2s_sentence" not in result.obs
    assert "removed 'c2s_sentence'" in scanpy_log.getvalue()


def test_n_genes_beyond_int64_is_refused(tmp_path):
    """`n_genes=2**70` used to be recorded as it was, and `write_h5ad` then failed on the params."""
    adata = hand_adata()
    with pytest.raises(ValueError, match=r"`n_genes` must be below 2\*\*63.*pass `n_genes=None`"):
        sc_c2s.pp.to_sentences(adata, n_genes=2**70)
    assert "c2s" not in adata.uns
    sc_c2s.pp.to_sentences(adata, n_genes=np.int64(2**63 - 1), rank_fit=False)
    assert type(adata.uns["c2s"]["params"]["n_genes"]) is int
    adata.write_h5ad(tmp_path / "a.h5ad")
    assert ad.read_h5ad(tmp_path / "a.h5ad").uns["c2s"]["params"]["n_genes"] == 2**63 - 1


def test_ties_follow_the_row_not_the_cell():
    """As documented: the tie-break key reads the cell's row, so a subset can order the same cell's ties otherwise."""
    assert "the cell's position (row) in the data" in " ".join(sc_c2s.pp.to_sentences.__doc__.split())
    subset = hand_adata()[[3]].copy()  # cell "3" in row 0
    differs = False
    for seed in range(8):
        sc_c2s.pp.to_sentences(subset, rank_fit=False, random_state=seed)
        tied = [GENES[g] for g in tie_order([0, 1, 3], seed, 0)]
        assert subset.obs["c2s_sentence"].iloc[0] == " ".join([*tied, "NKG7"])
        differs |= subset.obs["c2s_sentence"].iloc[0] != expected_hand(seed)[3]
    assert differs


def test_gene_symbols_of_raw_are_read_from_raw_var(pbmc68k):
    """The error used to say "not a column of var" and list the columns of `raw.var`, which is where it looked; its
    copy of the column left the genes that only `.raw` holds (`X` a subset of them) without a name."""
    adata = pbmc68k[:, pbmc68k.var_names != "CD74"].copy()
    adata.var["sym"] = pd.Categorical("sym-" + adata.var_names)
    with pytest.raises(KeyError, match=r"`gene_symbols='sym'` is not a column of raw\.var.*columns: \[\]") as error:
        sc_c2s.pp.to_sentences(adata, gene_symbols="sym")
    assert "Pass `use_raw=False` to rank `X` and read `var`" in error.value.args[0]
    assert "c2s" not in adata.uns
    (fix,) = re.findall(r"or copy the column, .*: `(.*)`\.$", error.value.args[0])
    exec(fix, {"adata": adata})  # the suggested fix
    sc_c2s.pp.to_sentences(adata, gene_symbols="sym", rank_fit=False)
    assert adata.obs["c2s_sentence"].iloc[0].split()[:3] == ["sym-FTL", "CD74", "sym-HLA-DPA1"]
    adata.raw.var.loc["FTL", "sym"] = "CD74"
    with pytest.raises(ValueError, match=r"1 gene names in raw\.var\['sym'\] occur more than once"):
        sc_c2s.pp.to_sentences(adata, gene_symbols="sym")


def test_duplicated_names_of_raw_are_named_with_a_fix_for_raw(pbmc68k):
    """The error named `var_names` and offered `adata.var_names_make_unique()`, which leaves `.raw` as it is."""
    raw = pbmc68k.raw.to_adata()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Variable names are not unique", UserWarning)  # anndata's, as a user sees
        raw.var_names = ["FTL", *raw.var_names[1:-1], "FTL"]
        pbmc68k.raw = raw
    with pytest.raises(
        ValueError, match=r"^1 gene names in raw\.var_names occur more than once \(e\.g\. FTL\)"
    ) as error:
        sc_c2s.pp.to_sentences(pbmc68k)
    (fix,) = re.findall(r"Make them unique with `(.*)`, or sum", error.value.args[0])
    exec(fix, {"adata": pbmc68k, "anndata": ad})
    sc_c2s.pp.to_sentences(pbmc68k, rank_fit=False)
    assert pbmc68k.raw.var_names.is_unique
    assert pbmc68k.raw.var_names[-1].startswith("FTL-")


@pytest.mark.parametrize("names", [range(5), [0, 1, "IL7R", 3.5, "NKG7"]], ids=["integers", "mixed"])
def test_names_that_are_not_strings_become_strings(container, names):
    """Integer var_names used to fail with a bare "sequence item 0: expected str instance, int found"."""
    adata = hand_adata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's own, about the names under test
        adata.var_names = pd.Index(names)
    data = container.wrap(adata)
    sc_c2s.pp.to_sentences(data, rank_fit=False)
    words = [str(name) for name in names]
    result = container.rna(data)
    assert result.uns["c2s"]["genes"].tolist() == words
    assert result.obs["c2s_sentence"].iloc[0] == " ".join(words[g] for g in (1, 4, 2))


def test_documented_width_of_obsm():
    """In memory, obsm was as wide as the longest sentence, for dask min(n_genes, n_vars): ad.concat of data
    ranked apart with the same `n_genes` cut the sentences to the narrowest part."""
    doc = " ".join(sc_c2s.pp.to_sentences.__doc__.split())
    assert "It has ``min(n_genes, n_vars)`` columns even when no cell expresses that many genes" in doc
    assert "or with ``n_genes=None`` as many as the longest sentence" in doc
    for n_genes, width in [(None, 4), (1, 1), (3, 3), (1000, 5)]:
        adata = hand_adata()
        sc_c2s.pp.to_sentences(adata, n_genes=n_genes, rank_fit=False)
        assert adata.obsm["c2s_genes"].shape == (4, width)


def test_params_record_sentences_and_mod(tmp_path, pbmc4k):
    """`sentences` and `mod` used to be left out of the recorded parameters."""
    mdata = md.MuData({"gex": pbmc4k})
    sc_c2s.pp.to_sentences(mdata, mod="gex", sentences=False, rank_fit=False)
    params = mdata.mod["gex"].uns["c2s"]["params"]
    assert params == {"use_raw": False, "mod": "gex", "sentences": False, "random_state": 0}
    pbmc4k.write_h5ad(tmp_path / "a.h5ad")
    assert ad.read_h5ad(tmp_path / "a.h5ad").uns["c2s"]["params"] == params
