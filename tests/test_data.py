"""`DataHandler` and `prepare`: one way in and out of AnnData and MuData."""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sc_c2s
from sc_c2s._data import DataHandler, prepare


def test_matrix_selection(container, pbmc68k):
    pbmc68k.layers["abs"] = abs(pbmc68k.X)
    handler = DataHandler(container.wrap(pbmc68k))

    raw = handler.matrix()  # raw when present
    assert raw.source == "raw.X"
    assert raw.X is pbmc68k.raw.X
    assert raw.var_names.equals(pbmc68k.raw.var_names)
    assert handler.matrix(use_raw=True).source == "raw.X"

    x = handler.matrix(use_raw=False)
    assert (x.source, x.X.shape) == ("X", pbmc68k.shape)
    assert x.var is pbmc68k.var

    layer = handler.matrix(layer="abs")  # a layer wins over raw
    assert layer.source == "layers['abs']"
    assert layer.X is pbmc68k.layers["abs"]


def test_log1p_base_is_read_from_uns(cellbench):
    assert DataHandler(cellbench).matrix().log1p_base is None
    sc.pp.log1p(cellbench, base=2)
    assert DataHandler(cellbench).matrix().log1p_base == 2
    assert DataHandler(cellbench).matrix().source == "X"  # no raw


def test_matrix_errors(pbmc4k):
    handler = DataHandler(pbmc4k)
    with pytest.raises(ValueError, match=r"Pass either `layer=` or `use_raw=True`, not both"):
        handler.matrix(layer="counts", use_raw=True)
    with pytest.raises(ValueError, match=r"`use_raw=True` but the AnnData has no `.raw`"):
        handler.matrix(use_raw=True)
    with pytest.raises(KeyError, match=r"No layer 'counts'"):
        handler.matrix(layer="counts")


def test_containers(pbmc4k):
    with pytest.raises(TypeError, match=r"Expected an AnnData or MuData object, got DataFrame"):
        DataHandler(pbmc4k.obs)
    handler = DataHandler(pbmc4k, mod="ignored")
    assert handler.adata is pbmc4k
    assert not handler.is_mudata
    with md.set_options(pull_on_update=False):
        mdata = md.MuData({"rna": pbmc4k})
    handler = DataHandler(mdata)
    assert handler.adata is mdata.mod["rna"]
    assert handler.is_mudata
    assert handler.n_obs == pbmc4k.n_obs
    with pytest.raises(KeyError, match=r"MuData has no modality 'atac'; pass `mod=` with one of \['rna'\]"):
        DataHandler(mdata, mod="atac")


def test_save_mirrors_obs_into_mudata(pbmc4k):
    """Cells missing from the modality get NaN in `mdata.obs`."""
    rna = pbmc4k[:10].copy()
    other = ad.AnnData(np.ones((12, 2)), obs=pd.DataFrame(index=pbmc4k.obs_names[:12]))
    with md.set_options(pull_on_update=False):
        mdata = md.MuData({"rna": rna, "adt": other})
    handler = DataHandler(mdata)
    handler.save("obs", "score", np.arange(10.0))
    handler.save("obsm", "emb", np.ones((10, 3)))
    handler.save("uns", "info", {"a": 1})
    np.testing.assert_array_equal(rna.obs["score"], np.arange(10.0))
    mirrored = mdata.obs["rna:score"]
    np.testing.assert_array_equal(mirrored.loc[rna.obs_names], np.arange(10.0))
    assert mirrored.loc[pbmc4k.obs_names[10:12]].isna().all()
    assert rna.obsm["emb"].shape == (10, 3)
    assert rna.uns["info"] == {"a": 1}
    assert "rna:emb" not in mdata.obsm


def test_save_mirrors_the_dtype(pbmc4k):
    """The mirror of a categorical column used to be of object dtype."""
    rna = pbmc4k[:10].copy()
    other = ad.AnnData(np.ones((12, 2)), obs=pd.DataFrame(index=pbmc4k.obs_names[:12]))
    with md.set_options(pull_on_update=False):
        mdata = md.MuData({"rna": rna, "adt": other})
    labels = pd.Categorical(["b", "a"] * 5, categories=["b", "a", "c"])
    DataHandler(mdata).save("obs", "label", labels)
    mirrored = mdata.obs["rna:label"]
    assert mirrored.dtype == rna.obs["label"].dtype == labels.dtype
    assert mirrored.loc[rna.obs_names].tolist() == list(labels)
    assert mirrored.loc[pbmc4k.obs_names[10:12]].isna().all()


def test_save_all_logs(container, pbmc4k, scanpy_log):
    data = container.wrap(pbmc4k)
    handler = DataHandler(data)
    start = sc.logging.info("computing")
    handler.save_all({("obs", "a"): np.zeros(pbmc4k.n_obs), ("uns", "b"): {}}, start=start)
    where = "mdata.mod['rna']." if container.is_mudata else "adata."
    assert f"added\n    'a', {where}obs,\n    'b', {where}uns" in scanpy_log.getvalue()


def test_c2s_needs_to_sentences(container, pbmc4k):
    handler = DataHandler(container.wrap(pbmc4k))
    where = "the 'rna' modality" if container.is_mudata else "this AnnData"
    with pytest.raises(KeyError, match=rf"No cell sentences found in {where}"):
        handler.c2s()


def ranked_apart(pbmc4k: ad.AnnData, **kwargs) -> tuple[ad.AnnData, ad.AnnData]:
    """The first 250 cells and the rest of pbmc4k, ranked each on its own."""
    parts = pbmc4k[:250].copy(), pbmc4k[250:].copy()
    for part in parts:
        sc_c2s.pp.to_sentences(part, **kwargs)
    return parts


def test_data_ranked_apart_with_the_same_n_genes_joins(pbmc4k):
    """obsm["c2s_genes"] was as wide as the longest sentence: concat's inner join cut all to the narrowest part."""
    parts = ranked_apart(pbmc4k, n_genes=1_000, rank_fit=False)
    assert [part.obsm["c2s_genes"].shape[1] for part in parts] == [1_000, 1_000]  # fewer genes than that expressed
    joined = ad.concat(parts, uns_merge="same")
    DataHandler(joined).c2s()
    np.testing.assert_array_equal(joined.obsm["c2s_genes"][250:], parts[1].obsm["c2s_genes"])


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        pytest.param({}, KeyError, r"has `obsm\['c2s_genes'\]` but not `uns\['c2s'\]`", id="uns left out"),
        pytest.param(
            {"uns_merge": "first"},
            ValueError,
            r"no longer matches `obs\['c2s_sentence'\]` for \d+ of 500 cells",
            id="cut to one width",
        ),
        pytest.param({"uns_merge": "first", "join": "outer"}, ValueError, r"holds float64 values", id="outer join"),
    ],
)
def test_data_ranked_apart_is_refused_where_sentences_no_longer_fit(pbmc4k, how, error, match):
    """Joined parts ranked apart without n_genes: cut to the narrowest part, silently (or a bare error)."""
    parts = ranked_apart(pbmc4k, rank_fit=False)
    assert parts[0].obsm["c2s_genes"].shape[1] != parts[1].obsm["c2s_genes"].shape[1]
    joined = ad.concat(parts, **how)
    with pytest.raises(error, match=rf"{match}.*Run `sc_c2s.pp.to_sentences` on this AnnData again"):
        DataHandler(joined).c2s()


def test_genes_in_another_order_are_refused(pbmc4k):
    """Parts with their genes in other orders, joined keeping the first part's genes: sentences named other genes."""
    first, second = ranked_apart(pbmc4k, n_genes=50)
    other = pbmc4k[250:, ::-1].copy()
    sc_c2s.pp.to_sentences(other, n_genes=50)
    joined = ad.concat([first, other], uns_merge="first")
    with pytest.raises(ValueError, match=r"for 250 of 500 cells \(first: '.*'\)"):
        DataHandler(joined).c2s()
    DataHandler(ad.concat([first, second], uns_merge="first")).c2s()  # the same genes: the sentences still fit
    merged = ad.concat([first, other], uns_merge="same")
    with pytest.raises(KeyError, match=r"lacks `uns\['c2s'\]\['genes'\]`"):
        DataHandler(merged).c2s()
    with pytest.raises(ValueError, match=r"has \['input', 'n_cells'.*to_sentences` on the joined data again"):
        sc_c2s.RankFit.from_dict(merged.uns["c2s"]["rank_fit"])


def test_ranking_without_its_params_is_refused(pbmc4k):
    """`generate` and `pl.rank_fit` failed with a bare `KeyError: 'params'`."""
    adata = pbmc4k[:20].copy()
    sc_c2s.pp.to_sentences(adata, n_genes=10)
    del adata.uns["c2s"]["params"]
    with pytest.raises(KeyError, match=r"lacks `uns\['c2s'\]\['params'\]`.*Run `sc_c2s.pp.to_sentences` on"):
        sc_c2s.pl.rank_fit(adata, show=False)


def test_columns_only_mudata_obs_holds_are_named_whatever_their_key(pbmc4k):
    """An integer column name failed with "'int' object is not iterable", and 0 was skipped."""
    adata = pbmc4k[:5].copy()
    adata.obs[0] = 1
    mdata = md.MuData({"rna": adata})
    mdata.obs[5] = 1  # not in the modality
    handler = DataHandler(mdata, "rna")
    handler.check_columns(groupby=0, pair_by=[0], label_key=None)
    for value in (5, [5]):
        with pytest.raises(KeyError, match=r"`groupby=5` is a column of `mdata.obs`, while sc_c2s reads the obs of"):
            handler.check_columns(groupby=value)


def test_sentences_are_compared_in_characters_and_any_case(pbmc4k):
    """Gene names beyond ASCII and sentences upper-cased since ranking still match their gene indices."""
    adata = pbmc4k[:50].copy()
    adata.var_names = [f"ifnγ-{i}" for i in range(adata.n_vars)]
    sc_c2s.pp.to_sentences(adata, n_genes=20, rank_fit=False)
    adata.obs["c2s_sentence"] = adata.obs["c2s_sentence"].str.upper()
    DataHandler(adata).c2s()
    adata.obs["c2s_sentence"] = adata.obs["c2s_sentence"].str.rsplit(" ", n=1).str[0]
    with pytest.raises(ValueError, match=r"for 50 of 50 cells .* or the sentences were edited"):
        DataHandler(adata).c2s()


def test_prepare(tmp_path, pbmc4k):
    copy = prepare(pbmc4k, copy=True)
    assert copy is not pbmc4k
    assert prepare(pbmc4k) is pbmc4k

    view = pbmc4k[:5]
    with pytest.warns(UserWarning, match="Received a view of an AnnData. Making a copy."):
        assert prepare(view) is view
    assert not view.is_view
    assert view.n_obs == 5

    pbmc4k.write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    loaded = prepare(backed, copy=True)
    assert not loaded.isbacked
    assert backed.isbacked

    with md.set_options(pull_on_update=False):
        mview = md.MuData({"rna": pbmc4k})[:7]
    with pytest.warns(UserWarning, match="Received a view of a MuData. Making a copy."):
        assert prepare(mview) is mview
    assert not mview.is_view
    assert mview.mod["rna"].n_obs == 7


def test_a_backed_mudata_takes_results_in_place_only(tmp_path, pbmc4k):
    """A copy, or a view, of it failed in mudata ("pass a filename") once the verb's work was done."""
    sc_c2s.pp.to_sentences(pbmc4k, n_genes=10)
    md.MuData({"rna": pbmc4k}).write(tmp_path / "x.h5mu")
    backed = md.read_h5mu(tmp_path / "x.h5mu", backed=True)
    for data, copy in [(backed, True), (backed[:5], False), (backed[:5], True)]:
        with pytest.raises(ValueError, match=r"backed by its \.h5mu file .* write the results into it in place"):
            sc_c2s.tl.embed(data, model="no-such-model", copy=copy)  # refused before the model is looked up
    assert prepare(backed) is backed


def test_a_mudata_naming_cells_twice_is_refused_before_any_work(pbmc4k):
    """Its results were written into the modality, then copying them into `mdata.obs` by name failed midway."""
    rna = pbmc4k[:6].copy()
    rna.obs_names = ["a", "a", *rna.obs_names[2:]]
    with pytest.warns(UserWarning, match="not unique"):
        mdata = md.MuData({"rna": rna})
    with pytest.raises(ValueError, match=r"The 'rna' modality names cells twice \(e\.g\. 'a'\).*obs_names_make_unique"):
        sc_c2s.pp.to_sentences(mdata)
    assert "c2s" not in mdata.mod["rna"].uns and "c2s_genes" not in mdata.mod["rna"].obsm


def test_columns_of_mdata_obs_only_and_sentences_of_another_modality_are_named(pbmc4k):
    """Both errors used to say "obs" or "run to_sentences", where the column or the sentences were elsewhere."""
    counts = np.random.default_rng(0).poisson(3, size=(pbmc4k.n_obs, 5)).astype(np.float32)
    prot = ad.AnnData(counts, obs=pd.DataFrame(index=pbmc4k.obs_names))
    mdata = md.MuData({"rna": pbmc4k, "prot": prot})
    mdata.obs["joint_leiden"] = "0"
    sc_c2s.pp.to_sentences(mdata, mod="prot")
    with pytest.raises(KeyError, match=r"The 'prot' modality holds them: pass `mod='prot'`"):
        sc_c2s.tl.embed(mdata, model="demo")
    with pytest.raises(KeyError, match=r"is a column of `mdata\.obs`.*`mdata\.mod\['prot'\]\.obs\['joint_leiden'\] ="):
        sc_c2s.tl.predict_tissue(mdata, model="demo", groupby="joint_leiden", mod="prot")
