from __future__ import annotations

import re

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import sc_c2s
from sc_c2s.models import load
from sc_c2s.tl import _finetune, _score_perturbation
from sc_c2s.tl._from_sentences import from_sentences

from .conftest import DATA

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_GENES = 20
KEYS = {"condition_key": "condition", "control": "control"}
HELD_OUT = "B"


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    """402 Kang PBMCs (B, CD4T, CD14+Mono; control and IFN-β stimulated) × 1,000 genes, ranked."""
    adata = ad.read_h5ad(DATA / "kang_400.h5ad")
    sc_c2s.pp.to_sentences(adata, n_genes=N_GENES)
    return adata


@pytest.fixture(scope="module")
def trained(kang, tmp_path_factory, one_torch_thread):
    """A tiny model trained from scratch on all cells but the stimulated B cells."""
    train = kang[~((kang.obs["cell_type"] == HELD_OUT) & (kang.obs["condition"] == "stimulated"))].copy()
    path = sc_c2s.tl.finetune(
        train,
        base_model="scratch",
        output_dir=tmp_path_factory.mktemp("perturbation") / "model",
        tasks=["perturbation"],
        pair_by="cell_type",
        n_genes=N_GENES,
        epochs=2,
        batch_size=16,
        **KEYS,
    )
    return load(path)


@pytest.fixture(scope="module")
def predicted(kang, trained) -> ad.AnnData:
    return sc_c2s.tl.predict_perturbation(
        kang[kang.obs["cell_type"] == HELD_OUT].copy(),
        model=trained,
        perturbations=["stimulated"],
        groupby="cell_type",
        n_genes=N_GENES,
        **KEYS,
    )


def test_finetune_records_the_perturbation_task(trained):
    metadata = trained.metadata
    assert metadata.tasks == ["perturbation"]
    assert metadata.perturbations == ["stimulated"]
    assert metadata.labels is None
    assert metadata.scores == {}
    training = metadata.training
    assert (training["condition_key"], training["control"], training["pair_by"]) == (
        "condition",
        "control",
        "cell_type",
    )
    assert training["n_perturbed_cells"] == training["n_samples"] == 67 + 67  # stimulated CD4T and CD14+Mono
    assert training["label_key"] is None
    vocabulary = trained.tokenizer.get_vocab()
    assert {"stimulated", "Perturbed", "basal", "cell's"} <= set(vocabulary)


def test_finetune_checks_its_keys(kang, tmp_path):
    with pytest.raises(ValueError, match="pass `label_key=`"):
        sc_c2s.tl.finetune(kang, base_model="scratch", output_dir=tmp_path / "a", tasks=["cell_type_prediction"])
    with pytest.raises(ValueError, match="needs `condition_key`"):
        sc_c2s.tl.finetune(kang, base_model="scratch", output_dir=tmp_path / "b", tasks=["perturbation"])
    with pytest.raises(ValueError, match="`control='ctrl'` is not a value"):
        sc_c2s.tl.finetune(
            kang, base_model="scratch", output_dir=tmp_path / "c", tasks=["perturbation"], condition_key="condition",
            control="ctrl",
        )  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_base_model_must_know_the_perturbations(kang, trained, tmp_path):
    """A scratch checkpoint trained further on perturbations it has no word for read them all as [UNK]: different
    perturbations got the same prompt, and `metadata.perturbations` listed them as learnt."""
    data = kang.copy()
    stimulated = data.obs["condition"] == "stimulated"
    data.obs["condition"] = np.where(stimulated, np.where(np.arange(data.n_obs) % 2, "IFNg", "TNF"), "control")
    with pytest.raises(ValueError, match=r"has no words for the names \['IFNg', 'TNF'\]"):
        sc_c2s.tl.finetune(
            data, base_model=trained.path, output_dir=tmp_path / "m", tasks=["perturbation"], pair_by="cell_type",
            n_genes=N_GENES, max_steps=1, **KEYS,
        )  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_sentences_longer_than_the_base_model_reads_are_refused_before_training(kang, trained, tmp_path, monkeypatch):
    """Continued with more genes than a scratch checkpoint's context holds, every sample was cut to fit: the whole
    budget trained on cut sentences, and predict_perturbation refused the model at its own `n_genes`. It is refused
    before training; the most genes it names train, one more is refused."""
    data = kang.copy()
    sc_c2s.pp.to_sentences(data, n_genes=200)
    kwargs = {"base_model": trained.path, "tasks": ["perturbation"], "pair_by": "cell_type", "max_steps": 1, **KEYS}
    with monkeypatch.context() as patch:
        patch.setattr(_finetune._trainer, "train", lambda *args, **kwargs: pytest.fail("trained"))
        with pytest.raises(ValueError, match=r"Perturbation prompts .* ask for at most `n_genes=\d+`") as info:
            sc_c2s.tl.finetune(data, output_dir=tmp_path / "m", n_genes=200, **kwargs)
        assert not (tmp_path / "m").exists()
        fit = int(re.search(r"n_genes=(\d+)", str(info.value))[1])
        assert N_GENES <= fit < 200
        with pytest.raises(ValueError, match=r"ask for at most `n_genes="):
            sc_c2s.tl.finetune(data, output_dir=tmp_path / "m", n_genes=fit + 1, **kwargs)
    model = load(sc_c2s.tl.finetune(data, output_dir=tmp_path / "m", n_genes=fit, **kwargs))
    assert model.metadata.n_genes == fit
    predicted = sc_c2s.tl.predict_perturbation(data, model=model, perturbations=["stimulated"], n_cells=2, **KEYS)
    assert predicted.uns["c2s_predict_perturbation"]["params"]["n_genes"] == fit


def test_context_of_small_multi_cell_samples_holds_perturbations(kang, tmp_path):
    """Samples of one cell set the scratch model's context below what a perturbation sample needs: 2 of 3 were cut."""
    data = kang[::3].copy()
    path = sc_c2s.tl.finetune(
        data, base_model="scratch", output_dir=tmp_path / "m", tasks=["tissue_prediction", "perturbation"],
        tissue_key="cell_type", n_cells=(1, 1), pair_by="cell_type", n_genes=N_GENES, max_steps=1, **KEYS,
    )  # fmt: skip
    model = load(path)
    assert model.tokenizer.model_max_length == 2 * N_GENES + 128
    assert model.metadata.training["n_truncated"] == 0


def test_predict_perturbation(kang, predicted, tmp_path):
    control_b = kang.obs_names[(kang.obs["cell_type"] == HELD_OUT) & (kang.obs["condition"] == "control")]
    assert predicted.n_obs == len(control_b) == 67
    assert list(predicted.var_names) == list(kang.var_names)
    assert list(predicted.obs["c2s_source_cell"]) == list(control_b)
    assert list(predicted.obs_names) == [f"{c}-stimulated" for c in control_b]
    assert set(predicted.obs["cell_type"]) == {HELD_OUT}
    assert set(predicted.obs["condition"]) == {"stimulated"}
    words = predicted.obs["c2s_sentence"].str.split()
    assert (words.map(len) == N_GENES).all()
    assert (predicted.obs["n_valid_genes"] == N_GENES).all()
    # X is the sentences read back with the data's rank fit
    expected = from_sentences(
        predicted.obs["c2s_sentence"].tolist(), genes=kang.var_names, rank_fit=kang.uns["c2s"]["rank_fit"]
    )
    np.testing.assert_allclose(predicted.X.toarray(), expected.X.toarray(), rtol=1e-6)
    params = predicted.uns["c2s_predict_perturbation"]["params"]
    assert params["perturbations"] == ["stimulated"] and params["n_control_cells"] == 67
    path = tmp_path / "predicted.h5ad"
    predicted.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.obs == predicted.obs).all().all()
    assert back.uns["c2s_predict_perturbation"]["params"]["rank_fit"] == params["rank_fit"]
    assert back.uns["log1p"] == {"base": 10}  # the rank fit's scale, for scanpy's verbs


def test_predict_perturbation_mudata_seeded_and_untouched(kang, trained, predicted, container):
    data = container.wrap(kang[kang.obs["cell_type"] == HELD_OUT].copy())
    before = container.rna(data).copy()
    again = sc_c2s.tl.predict_perturbation(
        data, model=trained, perturbations=["stimulated"], groupby="cell_type", n_genes=N_GENES, batch_size=5, **KEYS
    )
    pd.testing.assert_frame_equal(again.obs, predicted.obs)
    after = container.rna(data)
    assert (after.X != before.X).nnz == 0
    pd.testing.assert_frame_equal(after.obs, before.obs)
    assert after.uns.keys() == before.uns.keys()


def test_predict_perturbation_asks_for_the_genes_the_model_learnt(kang, trained):
    """`n_genes` defaulted to 200, which the prompt states, whatever the model was trained on."""
    predicted = sc_c2s.tl.predict_perturbation(kang, model=trained, perturbations=["stimulated"], n_cells=2, **KEYS)
    assert trained.metadata.n_genes == N_GENES
    assert predicted.uns["c2s_predict_perturbation"]["params"]["n_genes"] == N_GENES
    assert (predicted.obs["n_valid_genes"] + predicted.obs["n_duplicate_genes"] <= N_GENES).all()


def test_predict_perturbation_warns_of_sentences_ranked_with_fewer_genes(kang, trained, scanpy_log):
    """Prompts said "n_genes + 4 expressed genes" over sentences ranked with n_genes, silently (as in annotate)."""
    sc_c2s.tl.predict_perturbation(kang, model=trained, perturbations=["stimulated"], n_cells=2, **KEYS)
    assert "were ranked with" not in scanpy_log.getvalue()
    n_genes = N_GENES + 4
    sc_c2s.tl.predict_perturbation(
        kang, model=trained, perturbations=["stimulated"], n_genes=n_genes, n_cells=2, **KEYS
    )
    warning = (
        f"WARNING: The sentences were ranked with `n_genes={N_GENES}`, fewer than the {n_genes} genes asked for "
        f"here: each cell gives at most {N_GENES} genes, though prompts say {n_genes}. Rank them again with "
        f"`sc_c2s.pp.to_sentences(adata, n_genes={n_genes})`, or pass `n_genes={N_GENES}` here."
    )
    assert scanpy_log.getvalue().count(warning) == 1


def test_predict_perturbation_warns_of_control_cells_sharing_a_name(kang, trained, scanpy_log):
    """Only anndata's generic warning, at the end, said that the predicted cells' names repeat."""
    controls = kang[kang.obs["condition"] == "control"][:3].copy()
    controls.obs_names = ["cell", "cell", "other"]
    with pytest.warns(UserWarning, match="Observation names are not unique"):  # anndata's, for the result
        predicted = sc_c2s.tl.predict_perturbation(controls, model=trained, perturbations=["stimulated"], **KEYS)
    assert predicted.obs["c2s_source_cell"].tolist() == ["cell", "cell", "other"]
    assert (
        "WARNING: 1 obs_names are shared by several control cells: the names of the cells predicted from them and "
        "their obs['c2s_source_cell'] will not tell them apart; make them unique first"
    ) in scanpy_log.getvalue()


def test_predict_perturbation_samples_and_refuses(kang, trained):
    sample = sc_c2s.tl.predict_perturbation(
        kang, model=trained, perturbations=["stimulated"], n_genes=5, n_cells=7, random_state=3, **KEYS
    )
    assert sample.n_obs == 7
    assert (kang.obs.loc[sample.obs["c2s_source_cell"], "condition"] == "control").all()
    with pytest.raises(ValueError, match=r"does not know the perturbations \['LPS'\]"):
        sc_c2s.tl.predict_perturbation(kang, model=trained, perturbations=["LPS"], **KEYS)
    with pytest.raises(TypeError, match="list of names"):
        sc_c2s.tl.predict_perturbation(kang, model=trained, perturbations="stimulated", **KEYS)
    # any list-like of names: a Series or Categorical (e.g. of `obs[condition_key].unique()`) was refused
    stimulated = kang.obs["condition"][kang.obs["condition"] != "control"]
    for names in (pd.Series(["stimulated"]), stimulated.unique()):
        one = sc_c2s.tl.predict_perturbation(kang, model=trained, perturbations=names, n_genes=5, n_cells=2, **KEYS)
        assert one.uns["c2s_predict_perturbation"]["params"]["perturbations"] == ["stimulated"]
    with pytest.raises(ValueError, match="`temperature` must be"):  # only `generate` takes the model's temperature
        sc_c2s.tl.predict_perturbation(kang, model=trained, perturbations=["stimulated"], temperature=None, **KEYS)
    with pytest.raises(KeyError, match="condition_key='stim'"):
        sc_c2s.tl.predict_perturbation(
            kang, model=trained, perturbations=["stimulated"], condition_key="stim", control="control"
        )


OWN_COLUMNS = ("c2s_source_cell", "c2s_sentence", "n_valid_genes", "n_unknown_words", "n_duplicate_genes")


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        pytest.param(
            {"groupby": "condition", **KEYS},
            r"`groupby` must differ from `condition_key` \('condition'\)",
            id="groupby-is-condition_key",
        ),
        *(
            pytest.param(
                {"groupby": column, **KEYS},
                rf"`groupby='{column}'` is the name of a column that the predicted cells' obs holds for itself",
                id=f"groupby-{column}",
            )
            for column in OWN_COLUMNS
        ),
        pytest.param(
            {"condition_key": "n_valid_genes", "control": "control"},
            r"`condition_key='n_valid_genes'` is the name of a column that the predicted cells' obs holds for itself",
            id="condition_key-n_valid_genes",
        ),
    ],
)
def test_predict_perturbation_refuses_keys_of_its_own_columns(kang, tmp_path, keys, match):
    """A `groupby` or `condition_key` naming a column of the result failed in pandas ("cannot insert …, already
    exists") after all the generation; it is refused up front, before the model is read (here: there is none)."""
    data = kang.copy()
    for name, source in (("groupby", "cell_type"), ("condition_key", "condition")):
        if keys.get(name, "condition") not in data.obs:
            data.obs[keys[name]] = data.obs[source]
    before = data.obs.copy()
    with pytest.raises(ValueError, match=match):
        sc_c2s.tl.predict_perturbation(data, model=str(tmp_path / "no_model"), perturbations=["stimulated"], **keys)
    pd.testing.assert_frame_equal(data.obs, before)


def test_predict_perturbation_warns_of_control_cells_without_genes(kang, trained):
    """Control cells expressing no gene were prompted with no gene, silently (annotate warns of them)."""
    data = kang[(kang.obs["cell_type"] == HELD_OUT) & (kang.obs["condition"] == "control")][:6].copy()
    data.X = sparse.diags([0.0] * 3 + [1.0] * 3) @ data.X  # the first three cells express no gene
    sc_c2s.pp.to_sentences(data, n_genes=N_GENES)
    with pytest.warns(
        UserWarning, match=r"^3 control cells have empty sentences \(they express no gene\), so the cells"
    ):
        predicted = sc_c2s.tl.predict_perturbation(
            data, model=trained, perturbations=["stimulated"], n_genes=N_GENES, **KEYS
        )
    assert predicted.n_obs == 6


def real_as_predicted(kang: ad.AnnData, group: str) -> ad.AnnData:
    """The real stimulated cells of `group` posing as predicted ones: a perfect prediction."""
    cells = kang[(kang.obs["cell_type"] == group) & (kang.obs["condition"] == "stimulated")]
    words = sc_c2s.prompts.sentence_words(cells, n_genes=N_GENES)
    obs = cells.obs[["cell_type", "condition"]].astype(str).assign(c2s_sentence=[" ".join(w) for w in words])
    params = {"n_genes": N_GENES}  # as `predict_perturbation` records it
    return ad.AnnData(
        sparse.csr_matrix((cells.n_obs, 0)), obs=obs, uns={"c2s_predict_perturbation": {"params": params}}
    )


def test_score_perturbation_of_a_perfect_prediction(kang):
    scores = sc_c2s.tl.score_perturbation(kang, real_as_predicted(kang, "B"), groupby="cell_type", **KEYS)
    row = scores.loc[("B", "stimulated")]
    assert (row["n_perturbed"], row["n_control"], row["n_predicted"]) == (67, 67, 67)
    assert row["r2_all"] == pytest.approx(1) and row["r2_top100"] == pytest.approx(1)
    assert row["direction_top20"] == 1 and row["mmd"] == pytest.approx(0, abs=1e-6)
    assert row["direction_top20_unchanged"] == 0  # the control cells do not move
    for baseline in ("unchanged", "mean_shift"):
        assert row[f"r2_top100_{baseline}"] < 1 and row[f"mmd_{baseline}"] > 0
    # the other cell types respond to interferon alike: the mean shift beats the control cells as they are
    assert row["r2_top100_mean_shift"] > row["r2_top100_unchanged"]
    assert row["mmd_mean_shift"] < row["mmd_unchanged"]


def test_score_perturbation_of_cells_read_with_from_sentences(kang):
    """Cells read back by `from_sentences` score once they carry the sentences, as the error says."""
    perfect = real_as_predicted(kang, "B")
    read = sc_c2s.tl.from_sentences(
        perfect.obs["c2s_sentence"], genes=kang.var_names, rank_fit=kang.uns["c2s"]["rank_fit"]
    )
    read.obs[["cell_type", "condition"]] = perfect.obs[["cell_type", "condition"]]
    with pytest.raises(KeyError, match=r"from_sentences`, set their obs\['c2s_sentence'\] to the sentences"):
        sc_c2s.tl.score_perturbation(kang, read, groupby="cell_type", **KEYS)
    read.obs["c2s_sentence"] = perfect.obs["c2s_sentence"]
    scores = sc_c2s.tl.score_perturbation(kang, read, groupby="cell_type", n_genes=N_GENES, **KEYS)
    expected = sc_c2s.tl.score_perturbation(kang, perfect, groupby="cell_type", **KEYS)
    pd.testing.assert_frame_equal(scores, expected)


def test_a_single_group_has_no_mean_shift(kang):
    """The other groups make the mean shift: without them its figures are missing, and its direction read 0."""
    real = kang[kang.obs["cell_type"] == "B"].copy()
    scores = sc_c2s.tl.score_perturbation(real, real_as_predicted(kang, "B"), groupby="cell_type", **KEYS)
    row = scores.loc[("B", "stimulated")]
    assert row[[c for c in scores.columns if c.endswith("_mean_shift")]].isna().all()
    assert row["direction_top20"] == 1 and row["direction_top20_unchanged"] == 0


def test_top_de_genes_are_ranked_by_absolute_t():
    """A gene that goes down strongly is as differentially expressed as one that goes up."""
    perturbed = sparse.csr_matrix([[2.0, 1.0, 1.0, 0.0], [2.0, 3.0, 1.0, 0.0]])
    control = sparse.csr_matrix([[0.0, 1.0, 1.0, 5.0], [0.0, 2.0, 1.0, 5.0]])
    t = _score_perturbation._welch_t(perturbed, control)
    means = pd.DataFrame({"t": t}, index=pd.Index(["up", "mild", "flat", "down"], name="gene"))
    contrast = _score_perturbation.Contrast(perturbed, control, perturbed, np.zeros(4), means)
    assert set(contrast.top(2).index) == {"up", "down"}
    assert contrast.top(4).index[-1] == "flat"


def test_direction_counts_only_genes_that_move():
    """With fewer than 20 genes that differ at all, the top 20 held genes that do not move, on which the unchanged
    control cells "agreed" with the real perturbed ones: 0.75 here, for cells that do not move at all."""
    perturbed = sparse.csr_matrix([[2.0, 1.0, 1.0, 0.0], [2.0, 3.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0]])
    control = sparse.csr_matrix([[0.0, 1.0, 1.0, 0.0], [0.0, 2.0, 1.0, 0.0], [0.0, 3.0, 1.0, 0.0]])
    mean = {name: np.asarray(X.mean(axis=0)).ravel() for name, X in (("real", perturbed), ("unchanged", control))}
    means = pd.DataFrame(
        {**mean, "predicted": mean["real"], "mean_shift": mean["unchanged"] + 1.0},
        index=pd.Index(["moves", "same mean", "flat", "absent"], name="gene"),
    )
    means["t"] = _score_perturbation._welch_t(perturbed, control)
    assert (means["t"] != 0).sum() == 1
    one = _score_perturbation.Contrast(perturbed, control, perturbed, np.ones(4), means)
    row = _score_perturbation._scores(one, n_comps=2, max_cells=10, rng=np.random.default_rng(0), random_state=0)
    assert row["direction_top20"] == 1 and row["direction_top20_unchanged"] == 0
    assert row["direction_top20_mean_shift"] == 1  # every gene up by 1: right on the one that moves


def test_a_gene_at_one_value_everywhere_does_not_move():
    """Its float32 means in the two conditions came out an ulp apart, so it counted as moving, and a perfect
    prediction, which keeps it at its value, scored 0.5 instead of 1."""
    v = np.float32(2.2393)
    perturbed = sparse.csr_matrix(np.array([[2.0, v], [3.0, v], [2.5, v]], dtype=np.float32))
    control = sparse.csr_matrix(np.array([[0.0, v], [0.5, v], [0.2, v], [0.1, v], [0.3, v]], dtype=np.float32))
    predicted = sparse.csr_matrix(np.array([[2.5, v]] * 5, dtype=np.float32))
    mean = {name: _score_perturbation._mean(X) for name, X in (("real", perturbed), ("unchanged", control))}
    means = pd.DataFrame(
        {**mean, "predicted": _score_perturbation._mean(predicted), "mean_shift": mean["unchanged"] + 1.0},
        index=pd.Index(["moves", "flat"], name="gene"),
    )
    means["t"] = _score_perturbation._welch_t(perturbed, control)
    one = _score_perturbation.Contrast(perturbed, control, predicted, np.ones(2), means)
    row = _score_perturbation._scores(one, n_comps=2, max_cells=10, rng=np.random.default_rng(0), random_state=0)
    assert row["direction_top20"] == 1


def test_genes_of_equal_t_rank_in_gene_order():
    """Genes each in one perturbed cell and no control cell all have |t| = 1, up to an ulp either way, which ranked
    them (short sentences have many such genes among the top 100)."""
    values = np.random.default_rng(0).uniform(0.1, 3, size=12)
    perturbed, control = sparse.csr_matrix(np.diag(values)), sparse.csr_matrix((5, 12))
    t = _score_perturbation._welch_t(perturbed, control)
    assert np.ptp(t) > 0  # rounding
    means = pd.DataFrame({"t": t}, index=pd.Index([f"G{i}" for i in range(12)], name="gene"))
    contrast = _score_perturbation.Contrast(perturbed, control, perturbed, np.zeros(12), means)
    assert contrast.top(4).index.tolist() == ["G0", "G1", "G2", "G3"]


def test_welch_t_matches_scipy_for_groups_of_different_sizes():
    from scipy.stats import ttest_ind

    rng = np.random.default_rng(0)
    a = rng.poisson(3.0, size=(5, 6)).astype(float)
    b = rng.poisson(1.0, size=(40, 6)).astype(float) * rng.uniform(0.5, 3, size=6)
    t = _score_perturbation._welch_t(sparse.csr_matrix(a), sparse.csr_matrix(b))
    np.testing.assert_allclose(t, ttest_ind(a, b, equal_var=False).statistic, rtol=1e-10)


@pytest.mark.parametrize(("n_a", "n_b", "value"), [(3, 5, 2.2393), (30, 101, 0.79312), (10, 5, 1.82391346)])
def test_welch_t_of_float32_cells(n_a, n_b, value):
    """In float32, a gene at one value in every cell of both groups (the first gene of every sentence of a cell
    type) had means an ulp apart and t = inf, so it led the DE genes; t also strayed from scipy's by up to 1e-3."""
    from scipy.stats import ttest_ind

    rng = np.random.default_rng(0)
    a, b = (rng.poisson(2.0, size=(n, 5)).astype(np.float32) * np.float32(0.37) for n in (n_a, n_b))
    a[:, 0] = b[:, 0] = np.float32(value)
    t = _score_perturbation._welch_t(sparse.csr_matrix(a), sparse.csr_matrix(b))
    assert t[0] == 0
    expected = ttest_ind(a[:, 1:].astype(np.float64), b[:, 1:].astype(np.float64), equal_var=False).statistic
    np.testing.assert_allclose(t[1:], expected, rtol=1e-10)


def test_r2_is_the_squared_pearson_correlation():
    assert _score_perturbation._r2(pd.Series([1.0, 2.0, 3.0]), pd.Series([1.0, 3.0, 2.0])) == 0.25


def test_figures_of_an_imperfect_prediction_by_hand(kang):
    """The top-100 R² is over the 100 top DE genes, and the baselines are scored in a space fitted on real cells
    only: another prediction changes its own MMD, not theirs."""
    good = real_as_predicted(kang, "B")
    reversed_ = good.copy()  # the same genes, in the reverse order
    reversed_.obs["c2s_sentence"] = [" ".join(s.split()[::-1]) for s in good.obs["c2s_sentence"]]
    data = _score_perturbation.cells(kang, reversed_, groupby="cell_type", **KEYS)
    top = _score_perturbation.contrast(data, group="B", perturbation="stimulated").top(100)
    assert len(top) == 100
    a, b = (sc_c2s.tl.score_perturbation(kang, p, groupby="cell_type", **KEYS) for p in (good, reversed_))
    row = b.loc[("B", "stimulated")]
    assert row["r2_top100"] == pytest.approx(np.corrcoef(top["predicted"], top["real"])[0, 1] ** 2, rel=1e-9)
    assert row["r2_top100_unchanged"] == pytest.approx(np.corrcoef(top["unchanged"], top["real"])[0, 1] ** 2)
    assert a.loc[("B", "stimulated"), "mmd"] != row["mmd"]
    baselines = [c for c in a.columns if c.endswith(("_unchanged", "_mean_shift"))]
    pd.testing.assert_frame_equal(a[baselines], b[baselines])


def test_score_perturbation_leaves_out_cells_without_a_group_and_reads_numeric_conditions(kang):
    """Cells without a group were scored as a group "nan"; `control=0` did not find the 0s of a numeric column."""
    real = kang.copy()
    real.obs["condition"] = (real.obs["condition"] == "stimulated").astype(int)
    real.obs["cell_type"] = real.obs["cell_type"].astype(object)
    no_group = np.flatnonzero((kang.obs["cell_type"] == "CD4T").to_numpy())[:5]
    real.obs.iloc[no_group, real.obs.columns.get_loc("cell_type")] = np.nan
    predicted = real_as_predicted(kang, "B")
    predicted.obs["condition"] = "1"
    before = real.obs.copy()
    with pytest.warns(
        UserWarning, match=r"Left out 5 real and 0 predicted cells without a value in obs\['cell_type'\]"
    ):
        scores = sc_c2s.tl.score_perturbation(
            real, predicted, groupby="cell_type", condition_key="condition", control=0
        )
    assert scores.index.tolist() == [("B", 1)]  # the real cells' own value, not the predicted cells' "1"
    expected = sc_c2s.tl.score_perturbation(kang, real_as_predicted(kang, "B"), groupby="cell_type", **KEYS)
    # the five CD4 T cells left out change only the mean-shift baseline, which the other groups make
    columns = [c for c in scores.columns if "mean_shift" not in c]
    np.testing.assert_allclose(scores[columns].to_numpy(float), expected[columns].to_numpy(float))
    pd.testing.assert_frame_equal(real.obs, before)


def test_score_perturbation_takes_the_columns_own_values(kang):
    """Integer groups and boolean conditions were matched as strings only: `perturbation=True` failed with "'bool'
    object is not iterable", the index held "1" and "True", and `pl.perturbation(group=1)` found no cell of group 1."""
    matplotlib.use("Agg")
    codes = {"B": 1, "CD4T": 2, "CD14+Mono": 3}
    real = kang.copy()
    real.obs["cluster"] = real.obs["cell_type"].map(codes).astype(int)
    real.obs["treated"] = real.obs["condition"] == "stimulated"
    predicted = real_as_predicted(kang, "B")
    predicted.obs["cluster"] = predicted.obs["cell_type"].map(codes).astype(int)
    predicted.obs["treated"] = "True"  # predict_perturbation names perturbations as strings
    keys = {"condition_key": "treated", "control": False, "groupby": "cluster"}
    expected = sc_c2s.tl.score_perturbation(kang, real_as_predicted(kang, "B"), groupby="cell_type", **KEYS)
    for perturbation in (True, [True], "True", None):
        scores = sc_c2s.tl.score_perturbation(real, predicted, perturbation=perturbation, **keys)
        assert scores.index.tolist() == [(1, True)] and scores.index.names == ["cluster", "treated"]
        pd.testing.assert_series_equal(scores.loc[(1, True)], expected.iloc[0], check_names=False)
    ax = sc_c2s.pl.perturbation(real, predicted, group=1, perturbation=True, show=False, **keys)
    assert ax.get_title() == "1: top 20 DE genes"


def test_a_pair_scores_the_same_whatever_else_is_scored(kang):
    """One generator served every (group, perturbation) pair in turn, so where `max_cells` subsamples a pair's
    cells, its scores depended on the pairs scored before it; the seed drawn for `random_state=None` went unrecorded."""
    both = ad.concat([real_as_predicted(kang, "CD4T"), real_as_predicted(kang, "B")], uns_merge="first")
    kwargs = {"groupby": "cell_type", "max_cells": 10, **KEYS}
    alone = sc_c2s.tl.score_perturbation(kang, real_as_predicted(kang, "B"), **kwargs)
    together = sc_c2s.tl.score_perturbation(kang, both, **kwargs)
    assert together.index.tolist() == [("CD4T", "stimulated"), ("B", "stimulated")]
    pd.testing.assert_series_equal(together.loc[("B", "stimulated")], alone.loc[("B", "stimulated")])
    drawn = sc_c2s.tl.score_perturbation(kang, both, random_state=None, **kwargs)
    again = sc_c2s.tl.score_perturbation(kang, both, random_state=drawn.attrs["random_state"], **kwargs)
    pd.testing.assert_frame_equal(again, drawn)


class ReverseSet(set):
    """A set that iterates in reverse sorted order, as a set can under some hash seed."""

    def __iter__(self):
        return iter(sorted(super().__iter__(), reverse=True))


def test_a_set_of_perturbations_is_taken_in_sorted_order():
    """A set was taken in its iteration order, which changes with the hash seed, and so did the cells predicted for
    each perturbation (each cell's random stream is keyed by its position)."""
    assert sc_c2s.tl._predict_perturbation._perturbations(ReverseSet({"b", "a", "c"})) == ["a", "b", "c"]
    assert sc_c2s.tl._predict_perturbation._perturbations(["b", "a", "b"]) == ["b", "a"]  # a list keeps its order


def test_score_perturbation_counts_every_predicted_cell(kang):
    """`n_predicted` counted the cells of the MMD's subsample (`max_cells`), unlike `n_perturbed` and `n_control`."""
    scores = sc_c2s.tl.score_perturbation(kang, real_as_predicted(kang, "B"), groupby="cell_type", max_cells=10, **KEYS)
    row = scores.loc[("B", "stimulated")]
    assert (row["n_perturbed"], row["n_control"], row["n_predicted"]) == (67, 67, 67)
    assert row["r2_all"] == pytest.approx(1)


def test_score_perturbation_needs_two_cells_for_the_mmd(kang):
    """`max_cells=1` gave all-NaN MMD columns with numpy's "Mean of empty slice" warnings."""
    with pytest.raises(ValueError, match=r"`max_cells` must be at least 2, got 1: it bounds the cells"):
        sc_c2s.tl.score_perturbation(kang, real_as_predicted(kang, "B"), groupby="cell_type", max_cells=1, **KEYS)


def test_score_perturbation_names_predicted_perturbations_the_real_cells_lack(kang):
    """A perturbation named otherwise in the real cells was "left out" for too few real cells, then refused vaguely."""
    real = kang.copy()
    real.obs["condition"] = real.obs["condition"].astype(str).replace("stimulated", "STIMULATED")
    predicted = real_as_predicted(kang, "B")
    before_real, before_predicted = real.obs.copy(), predicted.obs.copy()
    match = (
        r"The predicted perturbations \['stimulated'\] are not values of the real cells' obs\['condition'\]; "
        r"values: \['STIMULATED', 'control'\]"
    )
    with pytest.raises(ValueError, match=match):
        sc_c2s.tl.score_perturbation(real, predicted, groupby="cell_type", **KEYS)
    pd.testing.assert_frame_equal(real.obs, before_real)
    pd.testing.assert_frame_equal(predicted.obs, before_predicted)


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data will no longer be the default")  # anndata 0.12 on zarr 3
def test_score_perturbation_reads_genes_from_zarr(kang, tmp_path):
    """Genes read back from zarr (a StringDType array) could not be cast to str."""
    pytest.importorskip("zarr", reason="zarr is optional for anndata 0.11")
    kang.write_zarr(tmp_path / "kang.zarr")
    real = ad.read_zarr(tmp_path / "kang.zarr")
    predicted = real_as_predicted(kang, "B")
    pd.testing.assert_frame_equal(
        sc_c2s.tl.score_perturbation(real, predicted, groupby="cell_type", **KEYS),
        sc_c2s.tl.score_perturbation(kang, predicted, groupby="cell_type", **KEYS),
    )


def test_score_perturbation_warns_when_most_predicted_words_are_not_real_genes(kang, scanpy_log):
    """Real cells ranked over a third of the genes dropped two thirds of the predicted words without a word.

    One warning, in the scores' terms: not also from_sentences' advice about its `genes=`, which the user did not pass.
    """
    real = kang[:, kang.var_names[::3]].copy()
    sc_c2s.pp.to_sentences(real, n_genes=N_GENES)
    with pytest.warns(UserWarning, match=r"\d+% of the words of the predicted sentences are not genes of the real"):
        sc_c2s.tl.score_perturbation(real, real_as_predicted(kang, "B"), groupby="cell_type", **KEYS)
    assert "not genes of `genes`" not in scanpy_log.getvalue()


def test_mean_shift_and_de_genes_by_hand(kang):
    data = _score_perturbation.cells(kang, real_as_predicted(kang, "B"), groupby="cell_type", **KEYS)
    one = _score_perturbation.contrast(data, group="B", perturbation="stimulated")
    X = from_sentences(
        [" ".join(w) for w in sc_c2s.prompts.sentence_words(kang, n_genes=N_GENES)],
        genes=kang.var_names,
        rank_fit=kang.uns["c2s"]["rank_fit"],
    ).X.toarray()

    def mean(cell_type, condition):
        return X[((kang.obs["cell_type"] == cell_type) & (kang.obs["condition"] == condition)).to_numpy()].mean(0)

    shift = np.mean([mean(t, "stimulated") - mean(t, "control") for t in ("CD4T", "CD14+Mono")], axis=0)
    np.testing.assert_allclose(one.means["mean_shift"], mean("B", "control") + shift, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one.means["unchanged"], mean("B", "control"), rtol=1e-5, atol=1e-6)
    from scipy.stats import ttest_ind

    is_b = (kang.obs["cell_type"] == "B").to_numpy()
    t, _ = ttest_ind(
        X[is_b & (kang.obs["condition"] == "stimulated").to_numpy()],
        X[is_b & (kang.obs["condition"] == "control").to_numpy()],
        equal_var=False,
    )
    np.testing.assert_allclose(one.means["t"], np.nan_to_num(t), rtol=1e-4, atol=1e-6)
    # interferon response genes lead the B cells' DE genes, upwards
    top = one.top(20)
    assert {"ISG15", "IFI6", "IFIT1"} <= set(top.index)
    assert (top.loc[["ISG15", "IFI6", "IFIT1"], "t"] > 0).all()


def test_de_genes_without_spread_lead():
    """A gene at one level in every perturbed cell and absent from every control cell had t = 0, ranked last."""
    perturbed = sparse.csr_matrix([[2.0, 1.0, 1.0, 0.0], [2.0, 3.0, 1.0, 0.0]])
    control = sparse.csr_matrix([[0.0, 1.0, 1.0, 5.0], [0.0, 2.0, 1.0, 5.0]])
    t = _score_perturbation._welch_t(perturbed, control)
    np.testing.assert_array_equal(t[[0, 2, 3]], [np.inf, 0.0, -np.inf])
    np.testing.assert_allclose(t[1], 0.5 / np.sqrt(2.0 / 2 + 0.5 / 2))


def test_score_perturbation_of_joined_predictions(kang, predicted):
    """Predictions joined by `anndata.concat` lose `uns`: the real cells were read through 200 genes, not the
    prediction's 20, and every figure moved, silently."""
    real = sc_c2s.pp.to_sentences(kang, copy=True)  # every expressed gene ranked
    expected = sc_c2s.tl.score_perturbation(real, predicted, groupby="cell_type", **KEYS)
    joined = ad.concat([predicted[:30], predicted[30:]])
    assert not joined.uns
    with pytest.warns(UserWarning, match=rf"real cells are read through {N_GENES} genes, as many as the longest"):
        scores = sc_c2s.tl.score_perturbation(real, joined, groupby="cell_type", **KEYS)
    pd.testing.assert_frame_equal(scores, expected)
    scores = sc_c2s.tl.score_perturbation(real, joined, groupby="cell_type", n_genes=200, **KEYS)
    assert scores.loc[("B", "stimulated"), "r2_all"] != expected.loc[("B", "stimulated"), "r2_all"]


def test_score_perturbation_of_the_model(kang, predicted, container):
    data = container.wrap(kang.copy())
    before = container.rna(data).copy()
    scores = sc_c2s.tl.score_perturbation(data, predicted, groupby="cell_type", **KEYS)
    assert list(scores.columns) == _score_perturbation.COLUMNS
    assert scores.index.names == ["cell_type", "condition"]
    assert list(scores.index) == [("B", "stimulated")]
    row = scores.iloc[0]
    assert 0 <= row["r2_all"] <= 1 and 0 <= row["direction_top20"] <= 1 and row["mmd"] > 0
    pd.testing.assert_frame_equal(container.rna(data).obs, before.obs)
    # a name of neither: it was refused as one without enough real cells
    match = r"`perturbation` names \['LPS'\], not values of the real cells' obs\['condition'\]: \['control', 'stim"
    with pytest.raises(ValueError, match=match):
        sc_c2s.tl.score_perturbation(data, predicted, groupby="cell_type", perturbation="LPS", **KEYS)
    with pytest.raises(ValueError, match=r"names \['control'\], not perturbations of any predicted cell: \['stimu"):
        sc_c2s.tl.score_perturbation(data, predicted, groupby="cell_type", perturbation="control", **KEYS)


def test_pl_perturbation(kang, predicted):
    matplotlib.use("Agg")
    ax = sc_c2s.pl.perturbation(kang, predicted, groupby="cell_type", group="B", show=False, **KEYS)
    assert len(ax.collections) == 3
    assert ax.get_title() == "B: top 20 DE genes"
    assert {t.get_text() for t in ax.texts} >= {"ISG15"}
    with pytest.raises(ValueError, match="No predicted cell of group 'CD4T'"):
        sc_c2s.pl.perturbation(kang, predicted, groupby="cell_type", group="CD4T", show=False, **KEYS)


@pytest.mark.parametrize(
    ("case", "n_perturbed", "perturbation"),
    [
        pytest.param("no perturbed", 0, "stimulated", id="no-perturbed"),
        pytest.param("one perturbed", 1, "stimulated", id="one-perturbed"),
        pytest.param("only control", 0, "stimulated", id="only-control"),
        pytest.param("other perturbation", 0, "LPS", id="other-perturbation"),
    ],
)
def test_pl_perturbation_needs_real_cells_of_both_conditions(kang, case, n_perturbed, perturbation):
    """Without real perturbed cells of the group it failed with a ZeroDivisionError; with one, it drew silently."""
    matplotlib.use("Agg")
    predicted = real_as_predicted(kang, "B")
    perturbed_b = ((kang.obs["cell_type"] == "B") & (kang.obs["condition"] == "stimulated")).to_numpy()
    keep = ~perturbed_b
    if case == "one perturbed":
        keep[np.flatnonzero(perturbed_b)[0]] = True
    elif case == "only control":
        keep = (kang.obs["condition"] == "control").to_numpy()
    elif case == "other perturbation":
        keep[:] = True
        predicted.obs["condition"] = "LPS"
    match = (
        rf"Group 'B' has too few real cells to compare: {n_perturbed} of perturbation '{perturbation}' and 67 "
        rf"control; at least {_score_perturbation.MIN_CELLS} of each are needed"
    )
    with pytest.raises(ValueError, match=match):
        sc_c2s.pl.perturbation(kang[keep].copy(), predicted, groupby="cell_type", group="B", show=False, **KEYS)


@pytest.mark.parametrize("label_genes", [-3, 2.5, True, "5", None])
def test_pl_perturbation_checks_label_genes(kang, label_genes):
    """`label_genes=-3` used to name 17 of 20 genes, `2.5` to fail in pandas."""
    with pytest.raises(ValueError, match=rf"`label_genes` .* must be a non-negative integer, got {label_genes!r}"):
        sc_c2s.pl.perturbation(
            kang,
            real_as_predicted(kang, "B"),
            groupby="cell_type",
            group="B",
            label_genes=label_genes,
            show=False,
            **KEYS,
        )


def test_pl_perturbation_names_label_genes(kang):
    matplotlib.use("Agg")
    predicted = real_as_predicted(kang, "B")
    for label_genes, n_named in [(0, 0), (np.int64(3), 3), (50, 20)]:
        ax = sc_c2s.pl.perturbation(
            kang, predicted, groupby="cell_type", group="B", label_genes=label_genes, show=False, **KEYS
        )
        assert len(ax.texts) == n_named


def test_pl_perturbation_lists_the_predicted_perturbations(kang):
    """An unknown `perturbation` was refused with the list of groups only."""
    with pytest.raises(ValueError, match=r"perturbation 'nope'; groups: \['B'\], perturbations: \['stimulated'\]\."):
        sc_c2s.pl.perturbation(
            kang, real_as_predicted(kang, "B"), groupby="cell_type", group="B", perturbation="nope", show=False, **KEYS
        )


def test_predicted_cells_are_as_long_as_their_control_cells(kang, trained):
    """On a targeted panel every predicted cell held the model's `n_genes` genes, those of the longest training
    sentence, however few its control cell expressed (a 200-gene panel of Kang's cells: 139 genes each, where the
    real stimulated B cells hold a median of 75)."""
    data = kang[(kang.obs["cell_type"] == HELD_OUT) & (kang.obs["condition"] == "control")][:8].copy()
    known = np.flatnonzero(data.var_names.isin(trained.metadata.vocabulary))  # genes the model can write
    detected = np.asarray((data.X[:, known] > 0).mean(axis=0)).ravel()
    data = data[:, known[np.argsort(-detected, kind="stable")][100:160]].copy()  # a panel of 60 of them
    sc_c2s.pp.to_sentences(data, n_genes=N_GENES)
    control = [len(w) for w in sc_c2s.prompts.sentence_words(data, n_genes=N_GENES)]
    assert 0 < min(control) < N_GENES
    predicted = sc_c2s.tl.predict_perturbation(data, model=trained, perturbations=["stimulated"], **KEYS)
    written = predicted.obs[["n_valid_genes", "n_duplicate_genes", "n_unknown_words"]].sum(axis=1)
    assert written.tolist() == control
    assert predicted.uns["c2s_predict_perturbation"]["params"]["lengths"] == "control"
    given = sc_c2s.tl.predict_perturbation(data, model=trained, perturbations=["stimulated"], n_genes=N_GENES, **KEYS)
    assert (given.obs[["n_valid_genes", "n_duplicate_genes", "n_unknown_words"]].sum(axis=1) == N_GENES).all()
    assert given.uns["c2s_predict_perturbation"]["params"]["lengths"] == "n_genes"
