"""sc_c2s.tl.generate: prompting, seeded sampling, stopping, and the AnnData it returns."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import sc_c2s
from sc_c2s import prompts
from sc_c2s._compat import cache_name
from sc_c2s._rank_model import RankFit
from sc_c2s._utils import _validate
from sc_c2s.models import C2SMetadata, C2SModel
from sc_c2s.models._scratch import build_model, build_tokenizer
from sc_c2s.tl import _sampling


@pytest.fixture(scope="module")
def _ranked(_cellbench) -> ad.AnnData:
    adata = _cellbench.copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol")
    return adata


@pytest.fixture
def ranked(_ranked) -> ad.AnnData:
    """CellBench cells ranked with gene symbols as words (var_names are Ensembl IDs)."""
    return _ranked.copy()


@pytest.fixture(scope="module")
def tiny(_ranked) -> C2SModel:
    """A random GPT-NeoX over the CellBench gene symbols and cell lines: it writes random words."""
    labels = sorted(_ranked.obs["cell_type"].unique())
    tokenizer = build_tokenizer(list(_ranked.uns["c2s"]["genes"]), labels)
    model = build_model(tokenizer, hidden_size=32, n_layers=1, n_heads=2).eval()
    metadata = C2SMetadata(name="tiny", labels=labels)
    return C2SModel(model=model, tokenizer=tokenizer, metadata=metadata, path=Path("tiny"))


class Scripted(torch.nn.Module):
    """A stand-in language model that writes the same tokens after any prompt, one per step, surely."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096, vocab_size=vocab_size)

    def forward(self, input_ids, **kwargs):
        # the "cache" is the number of steps taken, under the name the installed transformers uses
        step = kwargs.get(cache_name()) or 0
        logits = torch.full((input_ids.shape[0], 1, self.vocab_size), -100.0)
        logits[:, :, self.script[min(step, len(self.script) - 1)]] = 100.0
        return SimpleNamespace(logits=logits, **{cache_name(): step + 1})


def scripted(tiny: C2SModel, words: list[str], *, vocab_size: int | None = None, **metadata) -> C2SModel:
    ids = tiny.tokenizer.convert_tokens_to_ids(words)
    model = Scripted(ids, vocab_size or len(tiny.tokenizer))
    return C2SModel(
        model=model, tokenizer=tiny.tokenizer, metadata=C2SMetadata(name="scripted", **metadata), path=Path()
    )


def test_sentence_stops_at_period_and_maps_words_to_var_names(ranked, tiny):
    symbols = ranked.var["gene_symbol"]
    genes = ["CD99", "DPM1", "LASP1"]
    model = scripted(tiny, [*genes, "CD99", ".", "AK2", "FKBP4"])
    generated = sc_c2s.tl.generate(
        ranked, model=model, cell_types=["A549", "H838"], n_genes=20, unique_genes=False, exact_length=False
    )

    assert generated.obs["c2s_sentence"].tolist() == ["CD99 DPM1 LASP1 CD99"] * 2
    counts = generated.obs[["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]].to_numpy()
    np.testing.assert_array_equal(counts, [[3, 0, 1], [3, 0, 1]])
    # the result's columns are adata's Ensembl IDs; each symbol's value is the rank fit at its position
    assert generated.var_names.equals(ranked.var_names)
    assert generated.var["gene_symbol"].equals(symbols)
    expected = np.zeros(ranked.n_vars, dtype=np.float32)
    columns = [symbols.index[symbols == g][0] for g in genes]
    expected[ranked.var_names.get_indexer(columns)] = RankFit.from_dict(ranked.uns["c2s"]["rank_fit"]).predict(
        [0, 1, 2]
    )
    np.testing.assert_allclose(generated.X.toarray(), [expected, expected], rtol=1e-6)


def test_result_with_slashed_cell_types_round_trips_through_h5ad(ranked, tiny, tmp_path):
    model = scripted(tiny, ["DPM1", "."])
    generated = sc_c2s.tl.generate(ranked, model=model, cell_types={"CD4+/CD25 T Reg": 2, "B": 1}, n_genes=5)
    generated.write_h5ad(tmp_path / "generated.h5ad")
    back = ad.read_h5ad(tmp_path / "generated.h5ad")
    assert back.obs["cell_type"].tolist() == ["CD4+/CD25 T Reg"] * 2 + ["B"]
    assert list(back.uns["c2s_generate"]["params"]["cell_types"]) == ["CD4+/CD25 T Reg", "B"]
    assert back.uns["log1p"] == {"base": 10}  # the rank fit's scale, for scanpy's verbs


def test_sentence_stops_at_eos(ranked, tiny):
    model = scripted(tiny, ["DPM1", "[EOS]", "AK2"])
    generated = sc_c2s.tl.generate(ranked, model=model, cell_types=["A549"], n_genes=5, exact_length=False)
    assert generated.obs["c2s_sentence"].tolist() == ["DPM1"]


def test_token_budget_follows_n_genes(ranked, tiny):
    model = scripted(tiny, ["DPM1"])  # never stops
    generated = sc_c2s.tl.generate(
        ranked, model=model, cell_types=["A549"], n_genes=10, unique_genes=False, exact_length=False
    )
    max_new_tokens = generated.uns["c2s_generate"]["params"]["max_new_tokens"]
    assert generated.uns["c2s_generate"]["params"]["tokens_per_gene"] == 1  # one word-level token per gene
    assert 10 < max_new_tokens <= 14
    assert generated.obs["c2s_sentence"].iloc[0].split() == ["DPM1"] * max_new_tokens


def test_exact_length_blocks_the_early_period_and_ends_after_n_genes(ranked, tiny):
    # wants to stop after one gene: the period is blocked until five words, then DPM1 repeats are blocked
    early = sc_c2s.tl.generate(ranked, model=scripted(tiny, ["DPM1", "."]), cell_types=["A549"], n_genes=5)
    words = early.obs["c2s_sentence"].iloc[0].split()
    assert len(words) == 5
    assert words[0] == "DPM1"
    # never wants to stop: after ten words only the end of the sentence is allowed
    model = scripted(tiny, ["DPM1"])
    never = sc_c2s.tl.generate(ranked, model=model, cell_types=["A549"], n_genes=10, unique_genes=False)
    assert never.obs["c2s_sentence"].iloc[0] == " ".join(["DPM1"] * 10)
    assert never.uns["c2s_generate"]["params"]["exact_length"]


def test_exact_length_with_an_output_vocabulary_wider_than_the_tokenizer(ranked, tiny):
    # like Pythia's, whose 50,277 tokens have 50,304 logits: the extra logits are masks' padding, not words
    model = scripted(tiny, ["DPM1", "."], vocab_size=len(tiny.tokenizer) + 27)
    generated = sc_c2s.tl.generate(ranked, model=model, cell_types=["A549"], n_genes=5)
    words = generated.obs["c2s_sentence"].iloc[0].split()
    assert len(words) == 5
    assert words[0] == "DPM1"


def test_exact_length_with_a_random_model(ranked, tiny):
    cell_types = {"A549": 3, "H838": 2}
    exact = sc_c2s.tl.generate(ranked, model=tiny, cell_types=cell_types, n_genes=12, batch_size=2)
    assert [len(s.split()) for s in exact.obs["c2s_sentence"]] == [12] * 5
    free = sc_c2s.tl.generate(ranked, model=tiny, cell_types=cell_types, n_genes=12, batch_size=2, exact_length=False)
    # a random model stops wherever its period or end-of-sequence token comes up
    assert [len(s.split()) for s in free.obs["c2s_sentence"]] != [12] * 5


def test_word_starts_of_a_subword_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["CD99 CD74 DPM1 DPM3 LASP1."] * 10, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    # " CD99 CD74" is four tokens: "ĠCD", "99", "ĠCD", "74"
    pieces = tokenizer(" CD99 CD74", add_special_tokens=False)["input_ids"]
    starts, breaks = _sampling._word_starts(tokenizer, reference=pieces[0])
    texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # "Ġ" is a space: a token that starts with it and holds more begins a word; newlines and tabs do not
    np.testing.assert_array_equal(starts, [t.startswith("Ġ") and len(t) > 1 for t in texts])
    assert starts[pieces].sum() == 2
    # what would break the count of words: whitespace that begins no word, and special tokens
    expected = [t == "<eos>" or tokenizer.convert_tokens_to_string([t]).isspace() for t in texts]
    np.testing.assert_array_equal(breaks, expected)
    assert breaks[tokenizer.convert_tokens_to_ids(["Ċ", "Ġ"])].all()


def test_unique_genes_blocks_repeats(ranked, tiny):
    model = scripted(tiny, ["DPM1"])  # wants DPM1 at every step
    generated = sc_c2s.tl.generate(ranked, model=model, cell_types=["A549", "H838"], n_genes=10)
    assert generated.uns["c2s_generate"]["params"]["unique_genes"]
    for sentence in generated.obs["c2s_sentence"]:
        words = sentence.split()
        assert words[0] == "DPM1"
        assert len(words) == len(set(words))
    assert (generated.obs["n_duplicate_genes"] == 0).all()


def test_unique_genes_writes_genes_of_the_vocabulary_only(ranked, tiny):
    # wants a cell line's name, then a template word, then CD99 and the period
    model = scripted(tiny, ["H838", "cell", "CD99", "."])
    kwargs = {"model": model, "cell_types": ["A549"], "n_genes": 3}
    free = sc_c2s.tl.generate(ranked, unique_genes=False, **kwargs)
    assert free.obs["c2s_sentence"].iloc[0] == "H838 cell CD99"
    assert free.obs["n_unknown_words"].iloc[0] == 2
    # the blocked words' probability goes to the genes: a gene drawn from the flat rest, then the wanted CD99
    genes = sc_c2s.tl.generate(ranked, **kwargs)
    words = genes.obs["c2s_sentence"].iloc[0].split()
    assert len(words) == 3
    assert words[2] == "CD99"
    assert set(words) <= set(ranked.uns["c2s"]["genes"])
    assert genes.obs[["n_valid_genes", "n_unknown_words"]].iloc[0].tolist() == [3, 0]


@pytest.mark.parametrize("n_genes", [8, 5], ids=["more than there are", "as many as there are"])
def test_exact_length_stops_at_the_genes_there_are(ranked, tiny, scanpy_log, n_genes):
    few = ranked[:, ranked.var["gene_symbol"].isin(["CD99", "DPM1", "LASP1", "AK2", "FKBP4"])].copy()
    sc_c2s.pp.to_sentences(few, gene_symbols="gene_symbol")
    generated = sc_c2s.tl.generate(few, model=tiny, cell_types={"A549": 3}, n_genes=n_genes)
    for sentence in generated.obs["c2s_sentence"]:
        assert sorted(sentence.split()) == ["AK2", "CD99", "DPM1", "FKBP4", "LASP1"]
    warning = "can hold only the 5 genes of the vocabulary, not 8" if n_genes == 8 else "can hold only"
    assert (warning in scanpy_log.getvalue()) == (n_genes == 8)


def test_sentences_longer_than_the_context_name_the_n_genes_that_fit(ranked, tiny):
    """Used to warn that sentences hold only the genes there are, then fail on tokens sized for all asked."""
    limit = tiny.model.config.max_position_embeddings
    with pytest.raises(
        ValueError, match=rf"do not fit in the {limit} tokens 'tiny' reads; ask for at most `n_genes="
    ) as e:
        sc_c2s.tl.generate(ranked, model=tiny, cell_types=["A549"], n_genes=5000)
    most = int(e.value.args[0].rsplit("=", 1)[1].rstrip("`."))
    sc_c2s.tl.generate(ranked, model=tiny, cell_types=["A549"], n_genes=most)  # fits
    with pytest.raises(ValueError, match=r"do not fit"):
        sc_c2s.tl.generate(ranked, model=tiny, cell_types=["A549"], n_genes=most + 1)


def test_token_budget_with_multi_token_genes(tiny):
    one_token = _sampling.token_budget(tiny, np.array(["DPM1", "CD99"]), 10)
    np.testing.assert_array_equal(one_token["gene_ids"], sorted(tiny.tokenizer.convert_tokens_to_ids(["DPM1", "CD99"])))
    assert tiny.tokenizer.convert_tokens_to_ids(".") in one_token["stop_ids"]
    # "CD99." is two tokens, one of them the period: no repeat blocking, and the period cannot end a sentence
    split = _sampling.token_budget(tiny, np.array(["DPM1", "CD99."]), 10)
    assert split["gene_ids"] is None
    assert split["stop_ids"] == [tiny.tokenizer.eos_token_id]
    assert split["tokens_per_gene"] == 1.5


def test_sample_token_is_the_inverse_cdf_of_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3, 1e-9]])).repeat(4, 1)
    uniform = torch.tensor([0.1, 0.6, 0.75, 0.999999])
    # top_p=0.75 keeps 0.5 and 0.3 (0.5 < 0.75 before the second): renormalised 0.625 / 0.375, in token order
    np.testing.assert_array_equal(_sampling._sample_token(logits, uniform, 1.0, None, 0.75), [1, 1, 2, 2])
    # top_k=1 is greedy
    np.testing.assert_array_equal(_sampling._sample_token(logits, uniform, 1.0, 1, None), [1, 1, 1, 1])
    # no filter: token order 0.2, 0.5, 0.3, 1e-9 (cumulative 0.2, 0.7, 1.0, 1.0)
    np.testing.assert_array_equal(_sampling._sample_token(logits, uniform, 1.0, None, None), [0, 1, 2, 2])
    # a high temperature flattens to 1/4 each: u = 0.6 picks the third token
    np.testing.assert_array_equal(_sampling._sample_token(logits[:1], uniform[1:2], 1e6, None, None), [2])


@pytest.mark.parametrize(("top_k", "top_p"), [(None, None), (50, 0.95)])
def test_sample_token_ignores_rounding_between_nearly_equal_tokens(top_k, top_p):
    """Two tokens whose probabilities differ by rounding (as between batch shapes) give the same draws."""
    uniform = torch.linspace(0.01, 0.99, 99)
    uniform = uniform[((uniform - 0.3).abs() > 0.01) & ((uniform - 0.6).abs() > 0.01)]  # away from the boundaries
    tokens = [
        _sampling._sample_token(torch.log(torch.tensor([probs])).repeat(len(uniform), 1), uniform, 1.0, top_k, top_p)
        for probs in ([0.3, 0.3 + 1e-6, 0.4 - 1e-6], [0.3 + 1e-6, 0.3, 0.4 - 1e-6])
    ]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert set(tokens[0].tolist()) == {0, 1, 2}


def test_uniforms_depend_on_seed_and_cell_only():
    a = _sampling._uniforms(0, 5, 7)
    assert a.shape == (7,)
    np.testing.assert_array_equal(a, _sampling._uniforms(0, 5, 7))
    assert not np.array_equal(a, _sampling._uniforms(0, 6, 7))
    assert not np.array_equal(a, _sampling._uniforms(1, 5, 7))


def test_same_seed_same_cells_whatever_the_batch_size(ranked, tiny):
    cell_types = {"A549": 4, "H1975": 3, "HCC827": 2}
    kwargs = {"model": tiny, "cell_types": cell_types, "n_genes": 15}
    first = sc_c2s.tl.generate(ranked, random_state=3, batch_size=2, **kwargs)
    again = sc_c2s.tl.generate(ranked, random_state=3, batch_size=9, **kwargs)
    other = sc_c2s.tl.generate(ranked, random_state=4, batch_size=2, **kwargs)
    assert first.obs["c2s_sentence"].tolist() == again.obs["c2s_sentence"].tolist()
    assert (first.X != again.X).nnz == 0
    assert first.obs["c2s_sentence"].tolist() != other.obs["c2s_sentence"].tolist()
    # cells of one type differ from each other
    assert first.obs["c2s_sentence"].iloc[:4].nunique() == 4


def test_n_genes_defaults_to_the_models(ranked, tiny):
    """The prompt and the sentences' length follow the `n_genes` the model was trained on, 200 unless recorded."""
    model = dataclasses.replace(tiny, metadata=dataclasses.replace(tiny.metadata, n_genes=15))
    generated = sc_c2s.tl.generate(ranked, model=model, cell_types={"A549": 2})
    given = sc_c2s.tl.generate(ranked, model=tiny, cell_types={"A549": 2}, n_genes=15)
    assert generated.uns["c2s_generate"]["params"]["n_genes"] == 15
    assert generated.obs["c2s_sentence"].str.split().str.len().tolist() == [15, 15]
    pd.testing.assert_frame_equal(generated.obs, given.obs)
    assert tiny.metadata.n_genes == 200


def test_each_cell_type_is_asked_for_its_own_sentence_length(ranked, tiny, monkeypatch):
    """Every cell was asked for the model's `n_genes`, the length of the longest sentences in training: on a
    targeted panel, where cells hold 10 to 60 genes, every generated cell held as many genes as the densest. Types
    are now asked for their training median; a type without one, and every type when `n_genes` is passed, for
    `n_genes`, capped by the model's."""
    asked = []
    prompt = prompts.cell_type_generation
    monkeypatch.setattr(
        prompts, "cell_type_generation", lambda t, **kw: asked.append((t, kw["n_genes"])) or prompt(t, **kw)
    )
    lengths = {"A549": 4, "H1975": 7, "H2228": 300}
    model = dataclasses.replace(tiny, metadata=dataclasses.replace(tiny.metadata, n_genes=15, sentence_lengths=lengths))
    request = {"H1975": 2, "A549": 3, "H2228": 1, "H838": 1}
    generated = sc_c2s.tl.generate(ranked, model=model, cell_types=request)
    expected = {"H1975": 7, "A549": 4, "H2228": 15, "H838": 15}
    assert asked == list(expected.items())
    n_words = generated.obs["c2s_sentence"].str.split().str.len()
    assert n_words.tolist() == [expected[t] for t in generated.obs["cell_type"]]
    params = generated.uns["c2s_generate"]["params"]
    assert (params["n_genes"], params["n_genes_by_type"]) == (15, list(expected.values()))
    # real cells are compared through the model's `n_genes`, not the longest type's median
    short = sc_c2s.tl.generate(ranked, model=model, cell_types={"A549": 1, "H1975": 1})
    assert (short.uns["c2s_generate"]["params"]["n_genes"], short.n_obs) == (15, 2)
    given = sc_c2s.tl.generate(ranked, model=model, cell_types=request, n_genes=5)
    assert (given.obs["c2s_sentence"].str.split().str.len() == 5).all()


def test_result_layout_and_concat(ranked, tiny, scanpy_log):
    generated = sc_c2s.tl.generate(ranked, model=tiny, cell_types={"A549": 3, "H838": 2}, n_genes=12, batch_size=4)

    assert generated.obs_names.tolist() == [f"generated-{i}" for i in range(5)]
    assert generated.obs["cell_type"].tolist() == ["A549"] * 3 + ["H838"] * 2
    assert generated.obs["cell_type"].cat.categories.tolist() == ["A549", "H838"]
    assert generated.X.format == "csr"
    assert generated.X.dtype == np.float32
    # the counts match reading the sentences again over adata's words
    reread = sc_c2s.tl.from_sentences(
        generated.obs["c2s_sentence"], genes=ranked.uns["c2s"]["genes"], rank_fit=ranked.uns["c2s"]["rank_fit"]
    )
    cols = ["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]
    np.testing.assert_array_equal(generated.obs[cols].to_numpy(), reread.obs[cols].to_numpy())
    np.testing.assert_array_equal(generated.X.getnnz(axis=1), reread.obs["n_valid_genes"])
    params = generated.uns["c2s_generate"]["params"]
    assert params["cell_types"] == ["A549", "H838"]
    assert params["n_cells"] == [3, 2]
    assert params["model"] == "tiny"
    assert params["vocabulary"] == "adata"
    assert params["rank_fit"] == ranked.uns["c2s"]["rank_fit"]
    assert {"temperature", "top_k", "top_p", "random_state", "batch_size", "organism"} <= set(params)
    assert "generated 5 cells" in scanpy_log.getvalue()

    both = ad.concat([ranked, generated], label="origin", keys=["real", "generated"])
    assert both.shape == (ranked.n_obs + 5, ranked.n_vars)
    assert both.var_names.equals(ranked.var_names)
    assert both.obs["cell_type"].tolist()[-5:] == ["A549"] * 3 + ["H838"] * 2


def test_var_follows_a_subset_of_the_ranked_genes(pbmc68k, tiny, scanpy_log):
    """The genes left out of `X` were announced at the info level only: most of each generated cell is lost where
    the sentences were ranked in `.raw` beside highly variable genes in `var`, scanpy's usual layout."""
    sc_c2s.pp.to_sentences(pbmc68k)  # ranks .raw: 765 genes
    subset = pbmc68k[:, ::3].copy()
    labels = list(pbmc68k.obs["bulk_labels"].cat.categories)
    words = list(pbmc68k.raw.var_names[:3])
    tokenizer = build_tokenizer(list(pbmc68k.raw.var_names), labels)
    model = C2SModel(
        model=Scripted(tokenizer.convert_tokens_to_ids([*words, "."]), len(tokenizer)),
        tokenizer=tokenizer,
        metadata=C2SMetadata(name="scripted"),
        path=Path(),
    )
    generated = sc_c2s.tl.generate(subset, model=model, cell_types=["CD19+ B"], exact_length=False)
    assert generated.var_names.equals(subset.var_names)
    # three valid genes; only the first of them (raw column 0) is a column of the subset
    assert generated.obs["n_valid_genes"].iloc[0] == 3
    assert generated.X.nnz == 1
    assert generated.X[0, subset.var_names.get_loc(words[0])] > 0
    assert (
        "WARNING: 510 of 765 genes of the sentences were ranked in `.raw` and are not in `var`: the cells' sentences "
        "hold them, but their expression in `X` leaves them out. To keep them, pass `adata.raw.to_adata()`."
    ) in scanpy_log.getvalue()


def test_genes_reordered_or_left_out_of_var_after_ranking_keep_their_columns(ranked, tiny, scanpy_log):
    """A reordered ``var`` used to receive each word's value at the word's old position: in another gene's column."""
    genes = ["CD99", "DPM1", "LASP1"]
    model = scripted(tiny, [*genes, "."])
    kwargs = {"model": model, "cell_types": ["A549"], "n_genes": 20, "unique_genes": False, "exact_length": False}
    expected = sc_c2s.tl.generate(ranked, **kwargs)
    reordered = ranked[:, ::-1].copy()
    generated = sc_c2s.tl.generate(reordered, **kwargs)
    assert generated.var_names.equals(reordered.var_names)
    np.testing.assert_array_equal(generated[:, ranked.var_names].X.toarray(), expected.X.toarray())
    # a subset of the genes (refused before): words outside it are valid genes without a column
    keep = ~ranked.var["gene_symbol"].isin(["DPM1"]).to_numpy()
    subset = ranked[:, keep].copy()
    generated = sc_c2s.tl.generate(subset, **kwargs)
    assert generated.obs["n_valid_genes"].iloc[0] == 3
    np.testing.assert_array_equal(generated.X.toarray(), expected[:, subset.var_names].X.toarray())
    assert generated.X.nnz == 2
    assert "1 of 2000 genes of the sentences are no longer in `var`" in scanpy_log.getvalue()
    # the words are symbols: without the column they were read from, the genes cannot be found
    del subset.var["gene_symbol"]
    with pytest.raises(KeyError, match=r"var\['gene_symbol'\] \(`gene_symbols` of `sc_c2s.pp.to_sentences`\)"):
        sc_c2s.tl.generate(subset, **kwargs)


def test_integer_var_names(ranked, tiny):
    """`to_sentences` takes var_names of integers as their strings; `generate` found none of them in `var`."""
    model = scripted(tiny, ["CD99", "DPM1", "LASP1", "."])
    kwargs = {"model": model, "cell_types": ["A549"], "n_genes": 20, "unique_genes": False, "exact_length": False}
    expected = sc_c2s.tl.generate(ranked, **kwargs)
    ranked.var_names = pd.RangeIndex(ranked.n_vars)
    assert ranked.var_names.dtype == np.int64
    sc_c2s.pp.to_sentences(ranked, gene_symbols="gene_symbol")
    generated = sc_c2s.tl.generate(ranked, **kwargs)
    assert generated.var_names.tolist() == [str(i) for i in range(ranked.n_vars)]
    np.testing.assert_array_equal(generated.X.toarray(), expected.X.toarray())
    assert generated.X.nnz == 3


def test_genes_renamed_after_ranking_are_refused(ranked, tiny):
    """After renaming var_names, no generated gene had a column: X was all zeros, without a word."""
    ranked.var_names = ranked.var.pop("gene_symbol").to_numpy()
    sc_c2s.pp.to_sentences(ranked)  # the words are the var_names
    ranked.var_names = [f"ENSG{i:011d}" for i in range(ranked.n_vars)]
    with pytest.raises(ValueError, match=r"None of the 2000 genes of the sentences \(e.g. '.+'\) is a gene of `var`"):
        sc_c2s.tl.generate(ranked, model=tiny, cell_types=["A549"], n_genes=5)


def test_data_without_a_gene_of_the_vocabulary_is_refused(ranked, tiny):
    renamed = ranked.copy()
    renamed.var["gene_symbol"] = [f"X{i}" for i in range(renamed.n_vars)]
    sc_c2s.pp.to_sentences(renamed, gene_symbols="gene_symbol", rank_fit=True)
    with pytest.raises(ValueError, match=r"None of the 2000 genes of the data is a word of 'tiny'"):
        sc_c2s.tl.generate(renamed, model=tiny, cell_types=["A549"], n_genes=5)


def test_mudata_uses_the_modality(ranked, tiny, container):
    data = container.wrap(ranked)
    generated = sc_c2s.tl.generate(data, model=tiny, cell_types=["H2228"], n_genes=5)
    assert generated.var_names.equals(ranked.var_names)


def test_without_adata_uses_the_checkpoint_vocabulary(ranked, tiny):
    words = list(ranked.uns["c2s"]["genes"][:50])
    fit = {"slope": -0.5, "intercept": 2.0}
    model = scripted(tiny, ["DPM1", "CD99", "."], vocabulary=words, rank_fit=fit)
    generated = sc_c2s.tl.generate(model=model, cell_types=["A549"], n_genes=5, exact_length=False)
    assert generated.var_names.tolist() == words
    np.testing.assert_allclose(generated.X.toarray()[0, :2], [2.0, 2.0 - 0.5 * math.log10(2)], rtol=1e-6)
    assert generated.uns["c2s_generate"]["params"]["vocabulary"] == "checkpoint"


def test_without_adata_needs_vocabulary_and_rank_fit(tiny):
    with pytest.raises(ValueError, match=r"no vocabulary and no rank_fit.*Pass `adata`"):
        sc_c2s.tl.generate(model=tiny, cell_types=["A549"])


def test_numbers_are_not_cell_types(ranked, tiny):
    """A Series of counts per type used to be read as a list of the types "71", "69", …, in any model's prompts."""
    counts = ranked.obs["cell_type"].value_counts()
    tiny_without_labels = C2SModel(
        model=tiny.model, tokenizer=tiny.tokenizer, metadata=C2SMetadata(name="tiny"), path=Path("tiny")
    )
    with pytest.raises(TypeError) as error:
        sc_c2s.tl.generate(ranked, model=tiny_without_labels, cell_types=counts, n_genes=5)
    shown = ", ".join(str(n) for n in counts.iloc[:3])
    assert str(error.value) == (
        f"`cell_types` holds numbers ({shown}, …), not cell types. For a number of cells per type, pass a mapping "
        "type → count (e.g. `counts.to_dict()` of `adata.obs[key].value_counts()`); for cell types stored as "
        "numbers, convert them to names with `.astype(str)`."
    )
    for numbers in ([0, 1], np.array([2.0]), pd.Categorical([3, 3]), ["A549", 4], [True]):
        with pytest.raises(TypeError, match=r"holds numbers"):
            sc_c2s.tl.generate(ranked, model=tiny_without_labels, cell_types=numbers, n_genes=5)
    generated = sc_c2s.tl.generate(ranked, model=tiny, cell_types=counts.head(2).to_dict(), n_genes=5)
    assert generated.obs["cell_type"].value_counts().to_dict() == counts.head(2).to_dict()


@pytest.mark.parametrize("as_types", [pd.Categorical, pd.Index, pd.Series], ids=["Categorical", "Index", "Series"])
def test_pandas_list_likes_of_names(ranked, tiny, as_types):
    """A Categorical used to be refused ("not a Categorical"), though it is a list of names like the others."""
    names = ["H838", "A549", "H838"]
    generated = sc_c2s.tl.generate(ranked, model=tiny, cell_types=as_types(names), n_genes=5)
    assert generated.obs["cell_type"].tolist() == names
    assert generated.uns["c2s_generate"]["params"]["cell_types"] == ["H838", "A549"]


def test_unknown_cell_type_lists_the_known_ones(ranked, tiny):
    with pytest.raises(ValueError, match=r"does not know the cell types \['T cell'\].*A549"):
        sc_c2s.tl.generate(ranked, model=tiny, cell_types=["A549", "T cell"])


def test_unknown_model(ranked):
    with pytest.raises(ValueError, match="available"):
        sc_c2s.tl.generate(ranked, model="no-such-model", cell_types=["A549"])


def test_organism_is_checked_before_the_model_loads(ranked):
    for kwargs in ({"cell_types": ["A549"]}, {"tissues": {"lung": 2}}):
        with pytest.raises(ValueError, match="`organism` must be one of"):
            sc_c2s.tl.generate(ranked, model="no-such-model", organism="human", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cell_types": "A549"}, TypeError, "not one string"),
        ({"cell_types": []}, ValueError, "asks for no cells"),
        ({"cell_types": {"A549": -1}}, ValueError, "non-negative integers"),
        ({"cell_types": ["A549"], "n_genes": 0}, ValueError, "n_genes"),
        ({"cell_types": ["A549"], "temperature": 0}, ValueError, "temperature"),
        ({"cell_types": ["A549"], "top_k": 0}, ValueError, "top_k"),
        ({"cell_types": ["A549"], "top_p": 1.5}, ValueError, "top_p"),
        ({"cell_types": ["A549"], "random_state": -1}, ValueError, "random_state"),
        ({"cell_types": ["A549"], "random_state": 2**64}, ValueError, "random_state"),
        ({"cell_types": ["A549"], "random_state": "0"}, ValueError, "random_state"),
        ({"cell_types": ["A549"], "temperature": float("nan")}, ValueError, "temperature"),
        ({"cell_types": ["A549"], "temperature": "1"}, ValueError, "temperature"),
        ({"cell_types": ["A549"], "top_p": 0}, ValueError, "top_p"),
        ({"cell_types": {"A549": True}}, ValueError, "non-negative integers"),
        ({"cell_types": {"A549": 2.0}}, ValueError, "non-negative integers"),
        ({"cell_types": ["A549", ""]}, ValueError, "empty or multi-line"),
        ({"cell_types": ["A549\nH838"]}, ValueError, "empty or multi-line"),
        # unannotated cells: prompts of cell type "nan", refused only by a model with a label set, as unknown
        ({"cell_types": pd.Series(["A549", np.nan])}, ValueError, r"has 1 missing names \(None or NaN\)"),
        ({"cell_types": {None: 2, "A549": 1}}, ValueError, r"has 1 missing names \(None or NaN\)"),
        ({"cell_types": 3}, TypeError, "must be a list or a mapping"),
        ({"cell_types": ["A549"], "device": "cuda:9"}, ValueError, "device"),
        ({"cell_types": ["A549"], "batch_size": 0}, ValueError, "batch_size"),
        ({"cell_types": ["A549"], "organism": "Danio rerio"}, ValueError, "organism"),
        ({"cell_types": ["A549"], "organism": ""}, ValueError, "organism"),
        ({"cell_types": ["A549"], "cells_per_sample": 3}, ValueError, "`tissues=` only"),
    ],
)
def test_bad_arguments(ranked, tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        sc_c2s.tl.generate(ranked, model=tiny, **kwargs)


def test_adata_needs_sentences_and_rank_fit(cellbench, tiny):
    with pytest.raises(KeyError, match="to_sentences"):
        sc_c2s.tl.generate(cellbench, model=tiny, cell_types=["A549"])
    sc_c2s.pp.to_sentences(cellbench, gene_symbols="gene_symbol", rank_fit=False)
    with pytest.raises(KeyError, match="rank_fit=True"):
        sc_c2s.tl.generate(cellbench, model=tiny, cell_types=["A549"])


def test_adata_is_not_modified(ranked, tiny):
    before = ranked.copy()
    sc_c2s.tl.generate(ranked, model=tiny, cell_types=["A549"], n_genes=5)
    assert (ranked.X != before.X).nnz == 0
    assert list(ranked.uns) == list(before.uns)
    assert ranked.obs.equals(before.obs)


def test_random_state_none_and_generators(ranked, tiny):
    """None and numpy generators used to be refused; they draw a seed, recorded in params."""
    kwargs = {"model": tiny, "cell_types": {"A549": 2}, "n_genes": 5}
    np.random.seed(0)
    first = sc_c2s.tl.generate(ranked, random_state=None, **kwargs)
    np.random.seed(0)
    again = sc_c2s.tl.generate(ranked, random_state=None, **kwargs)
    seed = first.uns["c2s_generate"]["params"]["random_state"]
    assert seed == again.uns["c2s_generate"]["params"]["random_state"]
    replay = sc_c2s.tl.generate(ranked, random_state=seed, **kwargs)
    assert first.obs["c2s_sentence"].tolist() == replay.obs["c2s_sentence"].tolist()
    drawn = sc_c2s.tl.generate(ranked, random_state=np.random.default_rng(1), **kwargs)
    assert drawn.uns["c2s_generate"]["params"]["random_state"] == np.random.default_rng(1).integers(2**63)


def test_request_that_cannot_fit_in_memory_is_refused(ranked, tiny, monkeypatch):
    """`generate(cell_types={"A549": 10**7})` used to grow past 14 GB before the first cell came out."""
    monkeypatch.setattr(_validate, "available_memory", lambda: 2**30)
    monkeypatch.setattr(_sampling, "sample", lambda *args, **kwargs: pytest.fail("generation started"))
    with pytest.raises(
        ValueError, match=r"`cell_types` asks for 10,000,000 cells, about [\d.]+ GiB of results, but only 1\.0 GiB"
    ) as error:
        sc_c2s.tl.generate(ranked, model=tiny, cell_types={"A549": 10**7})
    fit = int(re.search(r"about ([\d,]+) cells fit", str(error.value)).group(1).replace(",", ""))
    assert 100_000 < fit < 10**6  # 200 genes of ~8 bytes of word and 8 bytes of matrix each, and a cell's overhead
    assert "own `random_state`" in str(error.value)
    assert "anndata.concat" in str(error.value)
    # the type of each cell alone takes 4 PB: numpy's MemoryError came first
    with pytest.raises(ValueError, match=r"`cell_types` asks for 1,000,000,000,000,000 cells"):
        sc_c2s.tl.generate(ranked, model=tiny, cell_types={"A549": 10**15})


def test_memory_is_not_checked_where_unknown(ranked, tiny, monkeypatch):
    monkeypatch.setattr(_validate, "available_memory", lambda: None)
    assert sc_c2s.tl.generate(ranked, model=tiny, cell_types={"A549": 1}, n_genes=3).n_obs == 1


def test_batches_are_assembled_in_cell_order():
    rng = np.random.default_rng(0)
    full = sparse.random(23, 11, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    order = rng.permutation(23)
    blocks = [(index, full[index]) for index in np.array_split(order, 5)]
    assembled = _sampling._assemble(blocks, n_cells=23, n_columns=11)
    assert not blocks
    assert assembled.dtype == np.float32
    assert (assembled != full).nnz == 0
    np.testing.assert_array_equal(assembled.indptr, full.indptr)


def test_uniforms_of_the_cells_are_disjoint_blocks_of_one_stream():
    """Cell c reads the c-th block of `width` numbers of the seed's Philox stream: no two cells share a number."""
    whole = np.random.Generator(np.random.Philox(key=7)).random(3 * 8)  # 7 steps take blocks of 8 numbers
    for cell in range(3):
        np.testing.assert_array_equal(_sampling._uniforms(7, cell, 7), whole[8 * cell : 8 * cell + 7])
    assert not np.intersect1d(_sampling._uniforms(0, 0, 8), _sampling._uniforms(0, 1, 8)).size


def test_budget_of_distinct_genes_has_room_for_the_longest():
    # 1 gene asked for: the mean (1.5 tokens per gene, 2 genes with the slack) gives 3 + 2 = 5 tokens, but the
    # longest distinct gene takes 6 tokens and its period one more
    assert _sampling.new_tokens(1.5, [[1], [2], [3, 4, 5, 6, 7, 8]], 1, 3) == 7
    # the two longest: 6 + 1 tokens and the period
    assert _sampling.new_tokens(1.5, [[1], [2, 9], [3, 4, 5, 6, 7, 8]], 2, 3) == 9


def test_a_reset_token_lets_a_row_write_its_genes_again():
    """Multi-cell texts: genes 0 and 1 are blocked once used, until token 3 (a new cell) frees them."""
    sampler = _sampling._Sampler(
        torch.rand(1, 5),
        temperature=1.0,
        top_k=1,  # greedy: the most likely token not blocked
        top_p=None,
        gene_ids=torch.tensor([0, 1]),
        length=None,
        reset_ids=torch.tensor([3]),
    )
    logits = torch.tensor([[5.0, 4.0, 0.0, 3.0]])
    assert [sampler(logits).item() for _ in range(5)] == [0, 1, 3, 0, 1]


def test_token_budget_spares_a_tenth_more_genes_and_two_tokens():
    assert _sampling.new_tokens(1.0, None, 10, None) == 13  # 11 genes of one token, and 2
    assert _sampling.new_tokens(1.5, None, 10, None) == 19  # ceil(1.5 * 11) + 2
    assert _sampling.new_tokens(1.0, None, 25, None) == 30  # ceil(27.5) = 28 genes, and 2
