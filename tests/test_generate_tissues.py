from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import sc_c2s
from sc_c2s._utils import _validate
from sc_c2s.models import C2SMetadata, C2SModel
from sc_c2s.models._scratch import build_model, build_tokenizer
from sc_c2s.tl import _generate_tissues, _sampling
from sc_c2s.tl._generate_tissues import check_tissues, requested_samples, split_cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA = Path(__file__).parent / "data"
N_GENES = 5


@pytest.fixture(scope="module")
def _tissues() -> ad.AnnData:
    adata = ad.read_h5ad(DATA / "tissue_mouse_300.h5ad")[::10].copy()
    sc_c2s.pp.to_sentences(adata, n_genes=N_GENES)
    return adata


@pytest.fixture(scope="module")
def tiny(_tissues) -> C2SModel:
    """A random 1-layer GPT-NeoX over the genes and tissues."""
    tokenizer = build_tokenizer([g.upper() for g in _tissues.uns["c2s"]["genes"]], ["lung", "kidney"], max_genes=8)
    model = build_model(tokenizer, hidden_size=32, n_layers=1, n_heads=2, max_length=512)
    metadata = C2SMetadata(name="tiny", organism="Mus musculus", tasks=["tissue_generation"])
    return C2SModel(model.eval(), tokenizer, metadata, Path("tiny"))


def test_requested_samples_split_each_tissue():
    request = {"lung": 7, "kidney": 5, "testis": 0}
    assert check_tissues(request, 5) == 12
    tissues, sizes = requested_samples(request, 5)
    assert (tissues, sizes.tolist()) == (["lung", "lung", "kidney"], [5, 2, 5])
    with pytest.raises(ValueError, match="`tissues` must map one-line tissue names"):
        check_tissues({"lung": -1}, 5)
    with pytest.raises(TypeError, match="`tissues` must be a mapping"):
        check_tissues(["lung"], 5)
    for missing in (np.nan, None):  # became the tissue "nan" (or "None") of every prompt
        with pytest.raises(ValueError, match="`tissues` must map one-line tissue names"):
            check_tissues({"lung": 1, missing: 2}, 5)


def test_split_cells_reads_blocks_in_order():
    assert split_cells("Cell 1:\nCd3d Il7r.\nCell 2:\nRp11-34p13.3 Ms4a1.\n.", 3) == [
        "Cd3d Il7r",
        "Rp11-34p13.3 Ms4a1",
        "",
    ]
    # a word-level tokenizer decodes with spaces around punctuation; the numbers are not checked
    assert split_cells("Cell 1 : A B . Cell 7 : C . .", 1) == ["A B"]
    assert split_cells("A B C", 2) == ["", ""]


def test_generated_samples_carry_tissue_and_sample(_tissues, tiny, container):
    data = container.wrap(_tissues.copy())
    before = _tissues.copy()
    kwargs = {"model": tiny, "tissues": {"lung": 4, "kidney": 3}, "cells_per_sample": 3, "n_genes": N_GENES}
    generated = sc_c2s.tl.generate(data, **kwargs)
    assert generated.n_obs == 7
    assert generated.var_names.equals(_tissues.var_names)
    assert generated.obs["tissue"].astype(str).tolist() == ["lung"] * 4 + ["kidney"] * 3
    assert generated.obs["sample"].astype(str).tolist() == ["sample-0"] * 3 + ["sample-1"] + ["sample-2"] * 3
    params = generated.uns["c2s_generate"]["params"]
    assert (params["tissues"], params["n_cells"], params["cells_per_sample"]) == (["lung", "kidney"], [4, 3], 3)
    assert generated.uns["log1p"] == {"base": 10}
    # the cells are their sentences read back through the rank fit
    for sentence, n_valid, row in zip(
        generated.obs["c2s_sentence"], generated.obs["n_valid_genes"], generated.X, strict=True
    ):
        assert row.nnz == n_valid <= len(sentence.split())
    again = sc_c2s.tl.generate(_tissues, **kwargs)
    np.testing.assert_array_equal(again.obs["c2s_sentence"], generated.obs["c2s_sentence"])
    rna = container.rna(data)
    assert (rna.X != before.X).nnz == 0 and rna.obs.equals(before.obs)


def test_generate_takes_cell_types_or_tissues(_tissues, tiny):
    with pytest.raises(ValueError, match="either `cell_types`"):
        sc_c2s.tl.generate(_tissues, model=tiny, cell_types=["B"], tissues={"lung": 1})
    with pytest.raises(ValueError, match="either `cell_types`"):
        sc_c2s.tl.generate(_tissues, model=tiny)


def test_tissues_the_model_was_not_trained_on_are_refused(_tissues, tiny):
    knows = copy.copy(tiny)
    knows.metadata = dataclasses.replace(tiny.metadata, tissues=["lung", "kidney"])
    with pytest.raises(ValueError, match=r"does not know the tissues \['liver'\]\. It was trained on: \['lung', "):
        sc_c2s.tl.generate(_tissues, model=knows, tissues={"lung": 2, "liver": 2})


def test_samples_hold_five_cells_unless_given(_tissues, tiny):
    generated = sc_c2s.tl.generate(_tissues, model=tiny, tissues={"lung": 7}, n_genes=N_GENES)
    assert generated.obs["sample"].astype(str).tolist() == ["sample-0"] * 5 + ["sample-1"] * 2
    assert generated.uns["c2s_generate"]["params"]["cells_per_sample"] == 5
    many = sc_c2s.tl.generate(_tissues, model=tiny, tissues={"lung": 11}, cells_per_sample=1, n_genes=N_GENES)
    # in the order written (they were sorted as text: sample-10 before sample-2)
    assert many.obs["sample"].cat.categories.tolist() == [f"sample-{i}" for i in range(11)]
    with pytest.raises(ValueError, match="`organism` must be one of"):
        sc_c2s.tl.generate(_tissues, model=tiny, tissues={"lung": 7}, organism="")


@pytest.mark.parametrize(("trained", "expected"), [([2, 3], 3), ([8, 12], 8), ([1, 20], 5)])
def test_samples_hold_as_many_cells_as_the_model_learnt(_tissues, tiny, trained, expected):
    """The default of 5 ignored the cells per sample the model was trained on: a model of 2 to 3 cells wrote 3 and
    left the other 2 cells of each sample empty."""
    model = copy.copy(tiny)
    model.metadata = dataclasses.replace(tiny.metadata, training={"n_cells": trained})
    generated = sc_c2s.tl.generate(_tissues, model=model, tissues={"lung": 3}, n_genes=N_GENES)
    assert generated.uns["c2s_generate"]["params"]["cells_per_sample"] == expected


def test_samples_too_long_for_the_model_name_cells_per_sample(_tissues, tiny):
    """The message offered `n_cells`, an argument of the other multi-cell verbs."""
    with pytest.raises(ValueError, match=r"lower `n_genes` \(or `cells_per_sample`, the cells of a group\)\.$"):
        sc_c2s.tl.generate(_tissues, model=tiny, tissues={"lung": 1000}, cells_per_sample=1000, n_genes=N_GENES)


@pytest.fixture
def eager_to_stop(_tissues, tiny):
    """The tiny model, made to write ``Cell : GENE .`` and then to prefer the end-of-sequence token to a next cell."""
    ids = tiny.tokenizer.convert_tokens_to_ids(["Cell", ":", _tissues.uns["c2s"]["genes"][0].upper(), "."])
    follows = dict(zip(ids, ids[1:] + ids[:1], strict=True))  # Cell → : → gene → . → Cell
    eos = tiny.tokenizer.eos_token_id

    def favour(module, args, kwargs, output):
        new = kwargs["input_ids"].shape[1] == 1  # else the prompts, which end with ":"
        for row, token in enumerate(kwargs["input_ids"][:, -1].tolist()):
            output.logits[row, -1, follows.get(token, ids[0]) if new else ids[0]] += 30
            if token == ids[-1]:
                output.logits[row, -1, eos] += 50

    handle = tiny.model.register_forward_hook(favour, with_kwargs=True)
    yield tiny
    handle.remove()


def test_samples_hold_the_cells_their_prompt_asks_for(_tissues, eager_to_stop):
    """The end-of-sequence token was allowed after the first cell: a model that ends a text early left the other
    cells of each sample empty, rows of zeros."""
    kwargs = {"model": eager_to_stop, "tissues": {"lung": 7}, "cells_per_sample": 3, "n_genes": N_GENES}
    generated = sc_c2s.tl.generate(_tissues, **kwargs)
    assert (generated.obs["n_valid_genes"] > 0).all()
    assert generated.uns["c2s_generate"]["params"]["exact_length"] is True
    free = sc_c2s.tl.generate(_tissues, exact_length=False, **kwargs)
    assert (free.obs["n_valid_genes"] > 0).tolist() == [True, False, False] * 2 + [True]


def test_sub_word_texts_end_where_the_model_ends_them(_tissues, builders, monkeypatch, scanpy_log):
    """A sub-word tokenizer writes the period of `RP11-34P13.3` as a token of its own: counted as the end of a cell,
    it let a text end before its cells were written, and the warning blamed the model. The hold is for models whose
    every gene is one token, and the record says when it held."""
    genes = [g.upper() for g in _tissues.uns["c2s"]["genes"]]
    tokenizer = builders.neox_tokenizer([*genes, "RP11-34P13.3"], ["lung"])
    assert "." in tokenizer.convert_ids_to_tokens(tokenizer(" RP11-34P13.3")["input_ids"])
    model = C2SModel(
        builders.neox_model(tokenizer), tokenizer, C2SMetadata(name="sub-word", organism="Mus musculus"), Path()
    )
    kwargs = {"model": model, "tissues": {"lung": 2}, "cells_per_sample": 2, "n_genes": N_GENES}
    generated = sc_c2s.tl.generate(_tissues, **kwargs)
    assert generated.uns["c2s_generate"]["params"]["exact_length"] is False

    def one_cell_each(c2s, prompt_ids, codes, *, sink, **kwargs):
        sink(np.arange(len(prompt_ids)), [f"Cell 1: {genes[0]}." for _ in prompt_ids])

    monkeypatch.setattr(_sampling, "sample", one_cell_each)
    sc_c2s.tl.generate(_tissues, **kwargs)  # not held, so the model ended the sample
    assert (
        "1 of 2 generated cells are empty: the model ended their samples before writing them" in scanpy_log.getvalue()
    )


def test_request_that_cannot_fit_in_memory_is_refused_before_its_samples_are_listed(_tissues, tiny, monkeypatch):
    """`tissues={"lung": 10**12}` listed its 2e11 samples one by one, for hours, before the memory check."""
    monkeypatch.setattr(_validate, "available_memory", lambda: 2**30)
    monkeypatch.setattr(_generate_tissues, "requested_samples", lambda *args: pytest.fail("samples listed"))
    with pytest.raises(
        ValueError, match=r"^`tissues` asks for 1,000,000,000,000 cells, about [\d.]+ GiB of results, but only 1\.0 GiB"
    ):
        sc_c2s.tl.generate(_tissues, model=tiny, tissues={"lung": 10**12})


def test_cells_a_model_ended_before_writing_are_announced(_tissues, tiny, monkeypatch, scanpy_log):
    """A model that ends a text after fewer `Cell {i}:` blocks than asked left rows of zeros without a word (a third
    of the cells of a small model trained on 2 to 4 cells per sample)."""
    gene = _tissues.uns["c2s"]["genes"][0].upper()

    def one_cell_each(c2s, prompt_ids, codes, *, sink, **kwargs):
        sink(np.arange(len(prompt_ids)), [f"Cell 1: {gene}." for _ in prompt_ids])

    monkeypatch.setattr(_sampling, "sample", one_cell_each)
    model = dataclasses.replace(tiny, metadata=dataclasses.replace(tiny.metadata, training={"n_cells": [2, 4]}))
    kwargs = {"model": model, "tissues": {"lung": 6}, "cells_per_sample": 3, "n_genes": N_GENES}
    generated = sc_c2s.tl.generate(_tissues, exact_length=False, **kwargs)
    assert (generated.obs["n_valid_genes"] > 0).tolist() == [True, False, False] * 2
    assert (
        "4 of 6 generated cells are empty: the model ended their samples before writing them (it was trained on 2 to 4 "
        "cells per sample)" in scanpy_log.getvalue()
    )
    sc_c2s.tl.generate(_tissues, **kwargs)  # held to its cells, the model wrote none of them
    assert "4 of 6 generated cells are empty: the model wrote no gene in them" in scanpy_log.getvalue()
