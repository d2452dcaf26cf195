from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sc_c2s
from sc_c2s import prompts
from sc_c2s.models._scratch import build_tokenizer

CELLS = [["Cd3d", "Il7r"], ["Ms4a1"]]


def test_cell_type_prediction_names_the_requested_number_of_genes():
    assert prompts.cell_type_prediction(["cd3d", "il7r"], n_genes=200, organism="Mus musculus") == (
        "The following is a list of 200 gene names ordered by descending expression level in a Mus musculus cell. "
        "Your task is to give the cell type which this cell belongs to based on its gene expression.\n"
        "Cell sentence: CD3D IL7R.\n"
        "The cell type corresponding to these genes is:"
    )
    assert prompts.cell_type_prediction(["cd3d", "il7r"]).startswith("The following is a list of 2 gene names ")


def test_multi_cell_sentences_number_cells_from_one():
    assert prompts.multi_cell_sentences(CELLS) == "Cell 1:\nCD3D IL7R.\nCell 2:\nMS4A1.\n"
    assert prompts.multi_cell_sentences(CELLS, upper=False) == "Cell 1:\nCd3d Il7r.\nCell 2:\nMs4a1.\n"
    assert prompts.multi_cell_sentences([]) == ""


def test_tissue_prediction_is_the_published_template():
    assert prompts.tissue_prediction(CELLS, n_genes=100, organism="Mus musculus") == (
        "The following is a list of 100 gene names ordered by descending expression level for 2 different "
        "Mus musculus cells. Your task is to give the tissue which these cells belong to based on their gene "
        "expression.\n"
        "Cell sentences:\n"
        "Cell 1:\nCD3D IL7R.\n"
        "Cell 2:\nMS4A1.\n"
        ".\n"
        "The tissue which these cells belong to is:"
    )


def test_tissue_generation_is_the_published_template_ending_with_a_newline():
    assert prompts.tissue_generation("lung", n_cells=5, n_genes=200, organism="Homo sapiens") == (
        "Generate a list of 200 genes in order of descending expression for 5 different Homo sapiens cells from "
        "a lung tissue.\nCell sentences:\n"
    )


def test_summary_is_the_published_template_without_a_cell_sentences_line():
    assert prompts.summary(CELLS, n_genes=3, organism="Homo sapiens", upper=False) == (
        "The following is a list of 3 gene names ordered by descending expression level for 2 different "
        "Homo sapiens cells. Your task is to produce an abstract summary summarizing the biological information "
        "contained in these cells.\n"
        "Cell 1:\nCd3d Il7r.\n"
        "Cell 2:\nMs4a1.\n"
        ".\n"
        "Abstract summary:"
    )


def test_sentences_longer_than_n_genes_are_cut_to_it():
    """DESIGN: the sentence is truncated to `n_genes` when prompting; the prompt said 1 gene over 3."""
    assert "Cell sentence: CD3D.\n" in prompts.cell_type_prediction(["cd3d", "il7r", "ms4a1"], n_genes=1)
    assert "Control cell sentence: CD3D IL7R.\n" in prompts.perturbation(
        ["cd3d", "il7r", "ms4a1"], perturbation_name="IFN-beta", n_genes=2
    )
    assert "Cell 1:\nCD3D.\nCell 2:\nMS4A1.\n" in prompts.tissue_prediction(CELLS, n_genes=1)
    assert "Cell 1:\nCD3D.\nCell 2:\nMS4A1.\n" in prompts.summary(CELLS, n_genes=1)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        # the package's own `obs["c2s_sentence"]` was written letter by letter
        (lambda: prompts.cell_type_prediction("FTL CD74"), TypeError, r"not one string: split a sentence"),
        (
            lambda: prompts.tissue_prediction(["FTL CD74"], n_genes=2),
            TypeError,
            r"`cells` must be a list of cells, each a list of gene names, got strings",
        ),
        (lambda: prompts.cell_type_prediction(["HLA A", "CD3D"]), ValueError, r"single words .*, got 'HLA A'"),
        (lambda: prompts.cell_sentence(["", "CD3D"]), ValueError, r"single words .*, got ''"),
        (lambda: prompts.cell_sentence(["CD3D", float("nan")]), TypeError, r"must be strings, got nan"),
        (lambda: prompts.cell_type_generation("T", n_genes=None), ValueError, "`n_genes` must be a positive"),
        (lambda: prompts.cell_type_prediction(["CD3D"], n_genes=0), ValueError, "`n_genes` must be a positive"),
        (lambda: prompts.tissue_generation("lung", n_cells=0, n_genes=3), ValueError, "`n_cells` must be a pos"),
        (lambda: prompts.tissue_prediction([], n_genes=3), ValueError, "`cells` must be a non-empty list"),
        (lambda: prompts.cell_type_generation("T\ncell", n_genes=3), ValueError, "`cell_type` must be a non-emp"),
        (lambda: prompts.tissue_generation(" ", n_cells=2, n_genes=3), ValueError, "`tissue` must be a non-empty"),
        (lambda: prompts.perturbation(["A"], perturbation_name=None), ValueError, "`perturbation_name` must be"),
        (lambda: prompts.summary(CELLS, n_genes=2, template="{foo}"), ValueError, r"placeholders \{num_genes\}"),
    ],
)
def test_prompts_refuse_what_would_break_their_layout(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_multi_cell_prompts_refuse_an_unknown_organism():
    with pytest.raises(ValueError, match="`organism` must be one of"):
        prompts.tissue_prediction(CELLS, n_genes=2, organism="Danio rerio")


@pytest.mark.parametrize(
    "text",
    [
        prompts.tissue_prediction(CELLS, n_genes=20, organism="Mus musculus"),
        prompts.tissue_generation("lung", n_cells=20, n_genes=2),
        prompts.summary(CELLS, n_genes=2),
    ],
    ids=["tissue_prediction", "tissue_generation", "summary"],
)
def test_word_level_tokenizers_know_every_template_word(text):
    tokenizer = build_tokenizer(["CD3D", "IL7R", "MS4A1"], ["lung"], max_genes=20)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids


def test_sentence_words_keep_the_first_gene_and_spell_the_sentences(pbmc68k):
    """Index 0 names a gene (the first of `uns["c2s"]["genes"]`); only -1 is past the end of a sentence."""
    adata = ad.AnnData(np.array([[5.0, 1.0, 0.0], [0.0, 2.0, 3.0]]), var=pd.DataFrame(index=["G0", "G1", "G2"]))
    sc_c2s.pp.to_sentences(adata, rank_fit=False)
    assert prompts.sentence_words(adata) == [["G0", "G1"], ["G2", "G1"]]
    sc_c2s.pp.to_sentences(pbmc68k, rank_fit=False)
    words = prompts.sentence_words(pbmc68k, n_genes=None)
    assert [" ".join(w) for w in words] == pbmc68k.obs["c2s_sentence"].tolist()


def test_multi_cell_sentences_take_any_iterable_of_cells():
    """A generator of cells was spent by the check for strings, and the text was empty."""
    cells = [["CD3D", "IL7R"], ["MS4A1"]]
    assert prompts.multi_cell_sentences(iter(cells)) == prompts.multi_cell_sentences(cells) != ""
