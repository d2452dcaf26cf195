from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch

import sc_c2s
from sc_c2s import prompts
from sc_c2s.models import C2SMetadata, C2SModel, _runtime
from sc_c2s.models._scratch import build_model, build_tokenizer
from sc_c2s.tl import _embed, _utils

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_GENES = 12  # the longest sentence of the `short_sentences` cells
#: Tokens of the prediction template before and after the sentence, for the word-level tokenizer.
PREFIX, SUFFIX = 42, 10


@pytest.fixture(scope="module")
def tiny(_short_sentences) -> C2SModel:
    """A random 2-layer GPT-NeoX with a word-level tokenizer over the genes."""
    tokenizer = build_tokenizer([g.upper() for g in _short_sentences.uns["c2s"]["genes"]])
    model = build_model(tokenizer, hidden_size=32, n_layers=2, n_heads=2, max_length=128)
    return C2SModel(model.eval(), tokenizer, C2SMetadata(name="tiny"), Path("tiny"))


def test_sentence_span_is_exactly_the_gene_tokens(short_sentences, tiny):
    words = _utils.cell_words(short_sentences, tiny, n_genes=N_GENES, mod=None)
    ids, spans = _embed.sentence_tokens(tiny, words, n_genes=N_GENES, organism="Homo sapiens")
    assert ids == _runtime.tokenize(
        tiny.tokenizer, _utils.prediction_prompts(words, n_genes=N_GENES, organism="Homo sapiens")
    )

    for seq, span, cell in zip(ids, spans, words, strict=True):
        # "The following is … Homo sapiens cell . … gene expression . Cell sentence :" are 42 words,
        # ". The cell type corresponding to these genes is :" 10
        assert len(seq) == PREFIX + len(cell) + SUFFIX
        assert span.tolist() == [PREFIX, PREFIX + len(cell)]
        assert seq[span[0] : span[1]] == tiny.tokenizer.convert_tokens_to_ids(cell)


def test_embedding_is_the_mean_over_gene_tokens(short_sentences, tiny):
    sc_c2s.tl.embed(short_sentences, model=tiny, n_genes=N_GENES, batch_size=7)

    expected = []
    for cell in _utils.cell_words(short_sentences, tiny, n_genes=N_GENES, mod=None):
        text = prompts.cell_type_prediction(cell, n_genes=N_GENES)
        ids = torch.as_tensor([tiny.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        expected.append(hidden[PREFIX : PREFIX + len(cell)].mean(0).numpy())
    embedding = short_sentences.obsm["X_c2s"]
    assert embedding.dtype == np.float32
    assert embedding.shape == (short_sentences.n_obs, 32)
    np.testing.assert_allclose(embedding, np.array(expected), atol=1e-5)


def test_results_params_and_neighbors(short_sentences, tiny, container, scanpy_log):
    data = container.wrap(short_sentences)
    x = short_sentences.X.copy()
    out = sc_c2s.tl.embed(data, model=tiny, n_genes=N_GENES, key_added="X_lm", copy=True)

    rna = container.rna(out)
    assert "X_lm" not in container.rna(data).obsm
    assert rna.uns["X_lm"]["params"] == {
        "n_genes": N_GENES,
        "organism": "Homo sapiens",
        "model": "tiny",
        "path": "tiny",
        "sha256": {},
    }
    assert (rna.X != x).nnz == 0
    assert "'X_lm', " in scanpy_log.getvalue()
    sc.pp.neighbors(rna, use_rep="X_lm", n_neighbors=5)
    assert rna.obsp["connectivities"].shape == (short_sentences.n_obs, short_sentences.n_obs)


def test_no_cells_give_an_empty_embedding(short_sentences, tiny):
    """As `annotate` gives empty columns: `embed` failed inside the tokenizer ("list index out of range")."""
    result = sc_c2s.tl.embed(short_sentences[:0].copy(), model=tiny, copy=True)
    assert result.obsm["X_c2s"].shape == (0, tiny.model.config.hidden_size)


def test_deterministic(short_sentences, tiny):
    a = sc_c2s.tl.embed(short_sentences, model=tiny, n_genes=N_GENES, copy=True).obsm["X_c2s"]
    b = sc_c2s.tl.embed(short_sentences, model=tiny, n_genes=N_GENES, batch_size=1, copy=True).obsm["X_c2s"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_without_sentences(tiny):
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    with pytest.raises(KeyError, match=r"to_sentences"):
        sc_c2s.tl.embed(adata, model=tiny)
    assert not adata.obsm


def test_empty_sentences(short_sentences, tiny):
    short_sentences.obsm["c2s_genes"][[2, 5]] = -1
    with pytest.raises(ValueError, match=r"2 cells have empty sentences.*filter_cells"):
        sc_c2s.tl.embed(short_sentences, model=tiny, n_genes=N_GENES)
    assert "X_c2s" not in short_sentences.obsm


def test_key_added_of_the_package(short_sentences, tiny):
    """`key_added="c2s_genes"` used to replace the gene indices with float embeddings."""
    genes = short_sentences.obsm["c2s_genes"].copy()
    with pytest.raises(ValueError, match=r"`key_added='c2s_genes'` would replace sc_c2s's own results"):
        sc_c2s.tl.embed(short_sentences, model=tiny, n_genes=N_GENES, key_added="c2s_genes")
    np.testing.assert_array_equal(short_sentences.obsm["c2s_genes"], genes)
    assert short_sentences.obsm["c2s_genes"].dtype == genes.dtype


def test_prompt_too_long(short_sentences, tiny):
    sc_c2s.pp.to_sentences(short_sentences, gene_symbols="gene_symbol", rank_fit=False)
    with pytest.raises(ValueError, match=r"reads at most 128; lower `n_genes`\.$"):
        sc_c2s.tl.embed(short_sentences, model=tiny, n_genes=200)
