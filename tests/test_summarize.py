from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sc_c2s
from sc_c2s import prompts
from sc_c2s.models import C2SModel
from sc_c2s.tl import _summarize, _utils

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA = Path(__file__).parent / "data"
N_GENES = 4
SUMMARIES = {
    "intestine": "Enterocytes and goblet cells of the gut",
    "kidney": "Epithelial cells of the nephron",
    "lung": "Immune cells of a lung tumour",
    "pancreas": "Endocrine progenitors of the embryonic pancreas",
    "stomach": "Pit and chief cells of the gastric mucosa",
    "testis": "Germ cells in meiosis",
}


@pytest.fixture(scope="module")
def summarizer(tmp_path_factory, one_torch_thread):
    """A tiny model trained from scratch to write each tissue's summary, from 60 cells of the mouse fixture."""
    adata = ad.read_h5ad(DATA / "tissue_mouse_300.h5ad")[::5].copy()
    sc_c2s.pp.to_sentences(adata, n_genes=N_GENES, rank_fit=False)
    adata.obs["summary"] = adata.obs["tissue"].map(SUMMARIES).astype(str)
    path = sc_c2s.tl.finetune(
        adata,
        base_model="scratch",
        output_dir=tmp_path_factory.mktemp("summary") / "model",
        tasks=["summary"],
        groupby="tissue",
        summaries="summary",  # an obs column, one text per group
        n_cells=(2, 3),
        n_genes=N_GENES,
        epochs=30,
        batch_size=8,
        paraphrase=True,
        organism="Mus musculus",
    )
    model = sc_c2s.models.load(path)
    assert model.metadata.training["eval_obs_names"] == []  # no cell-type task: no cell held out (docstring)
    return adata, model


def test_summaries_per_group_and_draw_reproducible_and_in_h5ad(summarizer, container, tmp_path):
    adata, model = summarizer
    data = container.wrap(adata.copy())
    before = adata.copy()
    kwargs = {"model": model, "groupby": "tissue", "n_cells": 3, "n_draws": 2, "temperature": 0.1, "max_new_tokens": 12}
    sc_c2s.tl.summarize(data, **kwargs)
    rna = container.rna(data)
    table = rna.uns["c2s_summary"]
    assert table["group"].astype(str).tolist() == [t for t in SUMMARIES for _ in range(2)]
    assert table["draw"].tolist() == [0, 1] * 6 and (table["n_cells"] == 3).all()
    # the model learnt the summaries
    assert np.mean([SUMMARIES[g] == s for g, s in zip(table["group"], table["summary"], strict=True)]) >= 0.75
    params = rna.uns["c2s_summary_params"]
    assert (params["n_genes"], params["n_draws"], params["random_state"]) == (N_GENES, 2, 0)
    # the same seed writes the same texts, another seed draws other cells
    again = sc_c2s.tl.summarize(adata.copy(), copy=True, **kwargs).uns["c2s_summary"]
    pd.testing.assert_frame_equal(again, table)
    # the input is untouched but for the results
    assert (rna.X != before.X).nnz == 0 and rna.obs.equals(before.obs)
    rna.write_h5ad(tmp_path / "summaries.h5ad")
    back = ad.read_h5ad(tmp_path / "summaries.h5ad").uns["c2s_summary"]
    assert back["summary"].tolist() == table["summary"].tolist()


def test_default_cells_per_prompt_are_as_many_as_the_model_read(summarizer):
    """`n_cells` used to default to 10, more than this model was trained on (2 to 3), so the prompts could be too
    long for it."""
    adata, model = summarizer
    table = sc_c2s.tl.summarize(adata, model=model, groupby="tissue", max_new_tokens=4, copy=True).uns["c2s_summary"]
    assert (table["n_cells"] == 3).all()


def test_a_model_not_trained_for_summaries_is_named(summarizer, scanpy_log):
    adata, model = summarizer
    kwargs = {"groupby": "tissue", "n_draws": 1, "max_new_tokens": 2, "copy": True}
    sc_c2s.tl.summarize(adata, model=model, **kwargs)
    assert "was not trained for summaries" not in scanpy_log.getvalue()
    metadata = replace(model.metadata, name="cell types", tasks=["cell_type_prediction"])
    sc_c2s.tl.summarize(adata, model=C2SModel(model.model, model.tokenizer, metadata, model.path), **kwargs)
    assert "'cell types' was not trained for summaries" in scanpy_log.getvalue()


def test_summary_paraphrases_keep_the_published_fields():
    cells = [["Cd3d"], ["Ms4a1"]]
    for template in prompts.SUMMARY_PARAPHRASES:
        text = prompts.summary(cells, n_genes=7, organism="Mus musculus", template=template)
        assert "7" in text and "2 Mus musculus cells" in text
        assert text.endswith("Cell 1:\nCD3D.\nCell 2:\nMS4A1.\n.\nAbstract summary:")


def test_summarize_checks_arguments(summarizer):
    adata, model = summarizer
    with pytest.raises(KeyError, match="`groupby='donor'` is not a column"):
        sc_c2s.tl.summarize(adata, model=model, groupby="donor")
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive integer"):
        sc_c2s.tl.summarize(adata, model=model, groupby="tissue", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"lower `n_genes` \(or `n_cells`, the cells of a group\)\.$"):
        sc_c2s.tl.summarize(adata, model=model, groupby="tissue", n_cells=50)  # offered `n_genes` only
    assert "c2s_summary" not in adata.uns


def test_the_seed_sets_the_sampling_of_the_same_cells(summarizer, monkeypatch):
    adata, model = summarizer
    # the same cells whatever the seed: only the sampling can tell the seeds apart
    monkeypatch.setattr(
        _summarize, "group_draws", lambda groups, **kw: _utils.group_draws(groups, **{**kw, "random_state": 0})
    )
    kwargs = {"model": model, "groupby": "tissue", "n_cells": 3, "temperature": 5.0, "max_new_tokens": 12, "copy": True}
    texts = [
        sc_c2s.tl.summarize(adata.copy(), random_state=seed, **kwargs).uns["c2s_summary"]["summary"].tolist()
        for seed in (0, 1)
    ]
    assert texts[0] != texts[1]
