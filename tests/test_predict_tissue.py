from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

import sc_c2s
from sc_c2s import prompts
from sc_c2s.models import C2SMetadata, C2SModel, _runtime
from sc_c2s.models._scratch import build_model, build_tokenizer
from sc_c2s.tl import _annotate, _predict_tissue, _samples, _utils

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA = Path(__file__).parent / "data"
N_GENES, N_CELLS, N_DRAWS = 6, 3, 2
TISSUES = ["intestine", "kidney", "lung", "pancreas", "stomach", "testis"]


@pytest.fixture(scope="module")
def _tissues() -> ad.AnnData:
    adata = ad.read_h5ad(DATA / "tissue_mouse_300.h5ad")[::5].copy()  # 60 cells, 30 samples of 1-4 cells
    sc_c2s.pp.to_sentences(adata, n_genes=N_GENES, rank_fit=False)
    return adata


@pytest.fixture
def tissues(_tissues) -> ad.AnnData:
    return _tissues.copy()


@pytest.fixture(scope="module")
def tiny(_tissues) -> C2SModel:
    """A random 1-layer GPT-NeoX with a word-level tokenizer over the genes and tissues."""
    tokenizer = build_tokenizer([g.upper() for g in _tissues.uns["c2s"]["genes"]], TISSUES, max_genes=N_GENES)
    model = build_model(tokenizer, hidden_size=32, n_layers=1, n_heads=2, max_length=256)
    return C2SModel(model.eval(), tokenizer, C2SMetadata(name="tiny", organism="Mus musculus"), Path("tiny"))


def test_group_draws_take_cells_of_one_group_seeded():
    groups = pd.Series(["b", "a", "b", None, "b", "a"], dtype="category")
    draws = _utils.group_draws(groups, n_cells=2, n_draws=3, random_state=0)
    assert [name for name, _ in draws] == ["a"] * 3 + ["b"] * 3
    for name, cells in draws:
        assert len(cells) == 2 == len(set(cells.tolist()))
        assert set(cells.tolist()) <= ({1, 5} if name == "a" else {0, 2, 4})
    again = _utils.group_draws(groups, n_cells=2, n_draws=3, random_state=0)
    assert all((x == y).all() for (_, x), (_, y) in zip(draws, again, strict=True))
    assert sorted(_utils.group_draws(groups, n_cells=5, n_draws=1, random_state=1)[0][1].tolist()) == [1, 5]


@pytest.mark.parametrize(("trained", "expected"), [(None, 10), ([2, 3], 3), ([5, 20], 10), ([12, 20], 12)])
def test_default_cells_per_prompt_fit_the_range_the_model_was_trained_on(tissues, tiny, trained, expected):
    """`n_cells` used to default to 10, too many for a model trained on 2 to 3 cells per prompt."""
    metadata = C2SMetadata(name="tiny", organism="Mus musculus", training={"n_cells": trained} if trained else {})
    model = C2SModel(tiny.model, tiny.tokenizer, metadata, Path("tiny"))
    assert _utils.prompt_cells(None, model) == expected
    assert _utils.prompt_cells(7, model) == 7
    sc_c2s.tl.predict_tissue(tissues, model=model, groupby="tissue", labels=TISSUES, n_genes=N_GENES, n_draws=1)
    assert tissues.uns["c2s_tissue"]["params"]["n_cells"] == expected


def test_gene_lists_are_answers_made_mostly_of_genes():
    genes = ["Cd3d", "Il7r", "Kit"]
    answers = ["lung", "CD3D IL7R", "Cd3d, Il7r, lung", "Kit", "small intestine", "CD3D lung tissue", None]
    assert _utils.gene_lists(answers, genes).tolist() == [False, True, True, False, False, False, False]


def test_constrained_tissues_average_the_log_likelihoods_of_the_draws(tissues, tiny, container, tmp_path):
    data = container.wrap(tissues)
    before = tissues.copy()
    sc_c2s.tl.predict_tissue(
        data, model=tiny, groupby="sample", labels=TISSUES, n_cells=N_CELLS, n_genes=N_GENES, n_draws=N_DRAWS
    )
    adata = container.rna(data)
    # by hand: the same draws, one prompt each, the label log-likelihoods averaged per sample
    words = [[w.upper() for w in cell] for cell in prompts.sentence_words(before, n_genes=N_GENES)]
    draws = _utils.group_draws(before.obs["sample"], n_cells=N_CELLS, n_draws=N_DRAWS, random_state=0)
    texts = [
        prompts.tissue_prediction([words[i] for i in c], n_genes=N_GENES, organism="Mus musculus") for _, c in draws
    ]
    loglik = _annotate.score_labels(tiny, _runtime.tokenize(tiny.tokenizer, texts), TISSUES, batch_size=4)
    mean = loglik.reshape(-1, N_DRAWS, len(TISSUES)).mean(1)
    table = adata.uns["c2s_tissue"]["groups"]
    assert table.index.tolist() == sorted(before.obs["sample"].unique())
    np.testing.assert_array_equal(table["tissue"].astype(str), np.array(TISSUES)[mean.argmax(1)])
    np.testing.assert_allclose(table["score"], softmax(mean, axis=1).max(1), rtol=1e-5)
    assert table["n_cells"].tolist() == before.obs["sample"].value_counts().reindex(table.index).tolist()
    expected = table["tissue"].astype(str).reindex(before.obs["sample"].astype(str)).to_numpy()
    np.testing.assert_array_equal(adata.obs["c2s_tissue"].astype(str), expected)
    assert adata.obs["c2s_tissue"].cat.categories.tolist() == sorted(set(expected))  # those given, for scanpy
    per_draw = adata.uns["c2s_tissue"]["draws"]
    assert len(per_draw) == len(draws) and per_draw["answer"].astype(str).tolist() == [
        TISSUES[k] for k in loglik.argmax(1)
    ]
    params = adata.uns["c2s_tissue"]["params"]
    assert (params["mode"], params["n_draws"], params["random_state"], params["labels"]) == (
        "constrained",
        N_DRAWS,
        0,
        TISSUES,
    )
    # the input is untouched but for the results
    assert (adata.X != before.X).nnz == 0
    np.testing.assert_array_equal(adata.obsm["c2s_genes"], before.obsm["c2s_genes"])
    if container.is_mudata:
        assert "rna:c2s_tissue" in data.obs
    # an h5ad round trip keeps the tables
    adata.write_h5ad(tmp_path / "tissues.h5ad")
    back = ad.read_h5ad(tmp_path / "tissues.h5ad").uns["c2s_tissue"]
    pd.testing.assert_frame_equal(back["groups"], table, check_categorical=False, check_index_type=False)
    assert back["draws"]["answer"].astype(str).tolist() == per_draw["answer"].astype(str).tolist()


@pytest.mark.parametrize(
    ("verb", "kwargs"),
    [(sc_c2s.tl.predict_tissue, {"labels": TISSUES}), (sc_c2s.tl.summarize, {"max_new_tokens": 2})],
    ids=["predict_tissue", "summarize"],
)
def test_groups_whose_cells_express_no_gene_warn(tissues, tiny, verb, kwargs):
    """A sample of cells without genes used to get a confident tissue (or a summary) from the bare prompt, silently."""
    sample = tissues.obs["sample"].iloc[0]
    tissues.obsm["c2s_genes"][(tissues.obs["sample"] == sample).to_numpy()] = -1  # its cells' sentences are empty
    del tissues.obs["c2s_sentence"]  # which would no longer match
    with pytest.warns(UserWarning, match=rf"The cells drawn for 1 groups express no gene \(e\.g\. '{sample}'\)"):
        verb(tissues, model=tiny, groupby="sample", n_cells=N_CELLS, n_genes=N_GENES, **kwargs)


@pytest.mark.parametrize("groupby", ["sample", "sample_score"])
def test_results_cannot_overwrite_the_groups(tissues, tiny, groupby):
    """`key_added="sample"` wrote the tissues (or their scores) over the groups they were predicted for."""
    tissues.obs["sample_score"] = tissues.obs["sample"]
    before = tissues.obs.copy()
    with pytest.raises(ValueError, match=rf"`key_added='sample'` would write the tissues over obs\['{groupby}'\]"):
        sc_c2s.tl.predict_tissue(tissues, model=tiny, groupby=groupby, labels=TISSUES, key_added="sample")
    pd.testing.assert_frame_equal(tissues.obs, before)


def test_repeated_draws_of_the_same_cells_do_not_raise_the_score(tissues, tiny):
    """The draws of a group of no more than `n_cells` cells hold the same cells; their log-likelihoods were summed,
    so the score of one-cell groups grew with `n_draws` without any new evidence."""
    tissues.obs["cell"] = tissues.obs_names.astype(str)  # every group is one cell
    kwargs = {"model": tiny, "groupby": "cell", "labels": TISSUES, "n_cells": N_CELLS, "n_genes": N_GENES}
    once = sc_c2s.tl.predict_tissue(tissues, n_draws=1, copy=True, **kwargs).uns["c2s_tissue"]["groups"]
    often = sc_c2s.tl.predict_tissue(tissues, n_draws=4, copy=True, **kwargs).uns["c2s_tissue"]["groups"]
    pd.testing.assert_series_equal(often["tissue"], once["tissue"])
    np.testing.assert_allclose(often["score"], once["score"], rtol=1e-5)


def test_a_model_not_trained_for_tissues_is_named(tissues, tiny, scanpy_log):
    sc_c2s.tl.predict_tissue(
        tissues, model=tiny, groupby="sample", labels=TISSUES, n_cells=N_CELLS, n_genes=N_GENES, n_draws=1
    )
    assert "'tiny' was not trained for tissue prediction" in scanpy_log.getvalue()


def test_free_answers_that_are_gene_lists_are_missing(tissues, tiny, monkeypatch):
    monkeypatch.setattr(_annotate, "MAX_ANSWER_TOKENS", 4)  # a random model writes genes, rarely a period
    n_samples = tissues.obs["sample"].nunique()
    with pytest.warns(UserWarning, match=rf"{n_samples} of {n_samples} answers are lists of genes, not tissues"):
        sc_c2s.tl.predict_tissue(tissues, model=tiny, groupby="sample", n_cells=N_CELLS, n_genes=N_GENES, n_draws=1)
    assert tissues.obs["c2s_tissue"].isna().all() and tissues.obs["c2s_tissue_score"].isna().all()
    assert tissues.uns["c2s_tissue"]["params"]["mode"] == "free"


def test_free_answers_that_are_tissues_of_the_model_are_kept(tissues, tiny, monkeypatch):
    """A tissue the model was trained on is a tissue, whatever its words."""
    a, b = (g.upper() for g in tissues.uns["c2s"]["genes"][:2])
    n_samples = tissues.obs["sample"].nunique()
    written = [f"{a} {b} niche"] * n_samples
    monkeypatch.setattr(_predict_tissue, "generate_answers", lambda *_, **__: (written, np.full(n_samples, 0.5)))
    metadata = C2SMetadata(name="niches", organism="Mus musculus", tissues=[*TISSUES, f"{a} {b} niche"])
    model = C2SModel(tiny.model, tiny.tokenizer, metadata, Path("niches"))
    sc_c2s.tl.predict_tissue(tissues, model=model, groupby="sample", n_cells=N_CELLS, n_genes=N_GENES, n_draws=1)
    assert (tissues.obs["c2s_tissue"] == f"{a} {b} niche").all()


def test_model_tissues_and_errors(tissues, tiny):
    with pytest.raises(ValueError, match="carries no tissues"):
        sc_c2s.tl.predict_tissue(tissues, model=tiny, groupby="sample", labels="model")
    with pytest.raises(KeyError, match="`groupby='donor'` is not a column"):
        sc_c2s.tl.predict_tissue(tissues, model=tiny, groupby="donor", labels=TISSUES)
    with pytest.raises(ValueError, match="`n_draws` must be a positive integer"):
        sc_c2s.tl.predict_tissue(tissues, model=tiny, groupby="sample", labels=TISSUES, n_draws=0)
    tissues.obs["everyone"] = "one group"
    with pytest.raises(ValueError, match=r"reads at most 256; lower `n_genes` \(or `n_cells`, the cells of a group\)"):
        sc_c2s.tl.predict_tissue(tissues, model=tiny, groupby="everyone", labels=TISSUES, n_cells=40, n_draws=1)
    assert "c2s_tissue" not in tissues.obs


def test_multi_cell_samples_hold_cells_of_one_tissue_and_group(tissues):
    units = _samples.units(
        tissues.obs,
        tasks=("tissue_prediction", "tissue_generation"),
        tissue_key="tissue",
        groupby="sample",
        summaries=None,
        n_cells=(2, 3),
    )
    assert units.tissues == TISSUES
    words = prompts.sentence_words(tissues, n_genes=N_GENES)
    cells = np.arange(tissues.n_obs)
    spec = units.spec(words, cells, n_genes=N_GENES)
    rng = np.random.default_rng(0)
    first, second = spec.draws(rng), spec.draws(rng)
    sizes = tissues.obs["sample"].value_counts()
    # per task, each sample of n cells gives ceil(n / 2.5) draws
    assert len(first) == len(second) == 2 * int(np.ceil(sizes[sizes > 0] / 2.5).sum())
    for task, unit, drawn in first:
        assert task in {"tissue_prediction", "tissue_generation"}
        assert 1 <= len(drawn) <= 3 and len(set(drawn.tolist())) == len(drawn)
        assert tissues.obs["sample"].iloc[drawn].nunique() == 1
        assert (tissues.obs["tissue"].iloc[drawn] == units.tissues_of[unit]).all()
    assert any(len(a[2]) != len(b[2]) or (a[2] != b[2]).any() for a, b in zip(first, second, strict=True))
    tokenizer = build_tokenizer([g.upper() for g in tissues.uns["c2s"]["genes"]], TISSUES, max_genes=N_GENES)
    samples = _samples.encode_multi_cell(
        tokenizer, spec, organism="Mus musculus", upper=True, max_length=512, rng=np.random.default_rng(0)
    )
    task, unit, drawn = first[0]
    prompt, answer = _samples.multi_cell_texts(
        task, [words[i] for i in drawn], units.tissues_of[unit], n_genes=N_GENES, organism="Mus musculus", upper=True
    )
    expected = tokenizer(prompt)["input_ids"] + tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert samples.input_ids[0].tolist() == [*expected, tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in np.concatenate(samples.input_ids[:-1]).tolist()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tissue_key": None}, ValueError, "learn tissues: pass `tissue_key=`"),
        ({"tissue_key": "organ"}, KeyError, "`tissue_key='organ'` is not a column"),
        ({"n_cells": (5, 2)}, ValueError, "`n_cells` must be"),
        ({"tasks": ("summary",)}, ValueError, "needs `groupby=`"),
    ],
)
def test_multi_cell_arguments_are_checked(tissues, kwargs, error, match):
    args = {
        "tasks": ("tissue_prediction",),
        "tissue_key": "tissue",
        "groupby": None,
        "summaries": None,
        "n_cells": (5, 20),
    }
    with pytest.raises(error, match=match):
        _samples.units(tissues.obs, **(args | kwargs))


def test_finetune_without_single_cell_tasks_needs_no_label_key(tissues, tmp_path):
    with pytest.raises(ValueError, match="learn cell types: pass `label_key=`"):
        sc_c2s.tl.finetune(tissues, base_model="scratch", output_dir=tmp_path / "m", tasks=["cell_type_prediction"])
    path = sc_c2s.tl.finetune(
        tissues,
        base_model="scratch",
        output_dir=tmp_path / "model",
        tasks=["tissue_prediction"],
        tissue_key="tissue",
        groupby="sample",
        n_genes=N_GENES,
        n_cells=(2, 3),
        epochs=1,
        organism="Mus musculus",
    )
    model = sc_c2s.models.load(path)
    assert model.metadata.tissues == TISSUES and model.metadata.labels is None
    assert model.metadata.tasks == ["tissue_prediction"] and model.metadata.scores == {}
    assert model.metadata.training["n_cells"] == [2, 3]
    sc_c2s.tl.predict_tissue(tissues, model=model, groupby="sample", labels="model", n_draws=1)
    assert set(tissues.obs["c2s_tissue"].astype(str)) <= set(TISSUES)
    assert tissues.uns["c2s_tissue"]["params"]["n_genes"] == N_GENES


def test_group_draws_are_random_subsets_not_the_first_cells():
    groups = pd.Series(["a"] * 10, dtype="category")
    draws = _utils.group_draws(groups, n_cells=3, n_draws=20, random_state=0)
    drawn = [cells.tolist() for _, cells in draws]
    # 20 draws of 3 of 10 cells without replacement: all cells come up, and the draws are not all alike
    assert sorted({c for cells in drawn for c in cells}) == list(range(10))
    assert len({tuple(sorted(cells)) for cells in drawn}) > 1
    assert all(len(set(cells)) == 3 for cells in drawn)
    # a group smaller than n_cells gives all of its cells, in a random order
    orders = {tuple(c.tolist()) for _, c in _utils.group_draws(groups, n_cells=20, n_draws=10, random_state=0)}
    assert all(sorted(o) == list(range(10)) for o in orders) and len(orders) > 1


def test_free_score_is_the_share_of_all_draws_missing_answers_included(monkeypatch):
    """Group g: draws answer lung, lung, (a gene list: no answer), kidney: lung, in 2 of the 4 draws, 0.5."""
    answers = ["lung", "lung", "CD3E CD8A", "kidney", "kidney"]
    monkeypatch.setattr(_predict_tissue, "generate_answers", lambda c2s, ids, **kw: (answers, np.ones(len(ids))))
    monkeypatch.setattr(_predict_tissue, "free_labels", lambda a, genes, **kw: [None if " " in x else x for x in a])
    c2s = SimpleNamespace(metadata=SimpleNamespace(tissues=None, vocabulary=None))
    groups = np.array(["g", "g", "g", "g", "h"], dtype=object)
    table, per_draw = _predict_tissue._majority(c2s, [[0]] * 5, groups, batch_size=1, genes=["CD3E", "CD8A"])
    assert table.loc["g"].tolist() == ["lung", 0.5]
    assert table.loc["h"].tolist() == ["kidney", 1.0]
