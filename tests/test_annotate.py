from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from scipy.special import logsumexp, softmax

import sc_c2s
from sc_c2s import prompts
from sc_c2s.models import C2SMetadata, C2SModel, _candidates, _runtime
from sc_c2s.models._scratch import build_model, build_tokenizer
from sc_c2s.tl import _annotate, _utils

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_GENES = 12  # the longest sentence of the `short_sentences` cells
LABELS = ["A549", "H1975", "H2228", "HCC827", "H838"]
#: Labels of one to four tokens (with their period), to exercise the packed scoring of multi-token answers.
LONG_LABELS = ["A549", "H1975 cell", "H2228 lung cell line", "HCC827 cell line"]


@pytest.fixture(scope="module")
def tiny(_short_sentences) -> C2SModel:
    """A random 2-layer GPT-NeoX with a word-level tokenizer over the genes and all test labels."""
    tokenizer = build_tokenizer([g.upper() for g in _short_sentences.uns["c2s"]["genes"]], [*LABELS, *LONG_LABELS])
    model = build_model(tokenizer, hidden_size=32, n_layers=2, n_heads=2, max_length=128)
    return C2SModel(model.eval(), tokenizer, C2SMetadata(name="tiny", labels=LABELS), Path("tiny"))


def train_namer(adata: ad.AnnData, labels: list[str], answers: pd.Series, *, name: str, steps: int = 60) -> C2SModel:
    """A 1-layer model trained for `steps` batches (60: a second) to write each cell's answer (and EOS, as finetune
    trains) after its prediction prompt of 8 genes; `labels` are the answers, which the tokenizer learns as words."""
    tokenizer = build_tokenizer([g.upper() for g in adata.uns["c2s"]["genes"]], labels)
    model = build_model(tokenizer, hidden_size=32, n_layers=1, n_heads=2, max_length=128)
    words = prompts.sentence_words(adata, n_genes=8)
    prompt_ids = tokenizer([prompts.cell_type_prediction(w) for w in words])["input_ids"]
    answer_ids = [
        [*a, tokenizer.eos_token_id]
        for a in tokenizer([prompts.answer(a) for a in answers], add_special_tokens=False)["input_ids"]
    ]
    ids = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
    input_ids, mask, positions = _runtime.left_pad(ids, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    targets = torch.full_like(input_ids, -100)  # learn the answers only
    for row, answer in enumerate(answer_ids):
        targets[row, -len(answer) :] = torch.as_tensor(answer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # dropout
        for _ in range(steps):
            batch = torch.as_tensor(rng.choice(len(ids), 32, replace=False))
            loss = model(
                input_ids=input_ids[batch],
                attention_mask=mask[batch],
                position_ids=positions[batch],
                labels=targets[batch],
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return C2SModel(model.eval(), tokenizer, C2SMetadata(name=name, labels=labels), Path(name))


@pytest.fixture(scope="module")
def _namer_cells(_cellbench) -> tuple[ad.AnnData, np.ndarray]:
    """300 CellBench cells ranked by their top 8 of 200 highly variable genes; which of them are held out."""
    adata = _cellbench
    lognorm = sc.pp.log1p(sc.pp.normalize_total(adata, copy=True), copy=True)
    adata = adata[:, sc.pp.highly_variable_genes(lognorm, n_top_genes=200, inplace=False)["highly_variable"]].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=8, rank_fit=False)
    return adata, np.arange(adata.n_obs) % 3 == 0


@pytest.fixture(scope="module")
def trained(_namer_cells, one_torch_thread) -> tuple[C2SModel, ad.AnnData, np.ndarray]:
    """A model trained to name the cell line of 200 CellBench cells; the 300 cells; which of them are held out."""
    adata, held_out = _namer_cells
    answers = adata.obs["cell_type"][~held_out].astype(str)
    return train_namer(adata[~held_out], LABELS, answers, name="trained"), adata, held_out


def full_sequence_loglik(c2s: C2SModel, adata: ad.AnnData, labels: list[str]) -> np.ndarray:
    """Log-likelihood of each label's answer after each prompt: per cell, one forward pass over the prompt followed
    by each answer (padded on the right, which causal attention never sees), without cache or custom mask."""
    tokenizer, out = c2s.tokenizer, []
    answers = [tokenizer(prompts.answer(label), add_special_tokens=False)["input_ids"] for label in labels]
    for words in prompts.sentence_words(adata, n_genes=N_GENES):
        prompt = tokenizer(prompts.cell_type_prediction(words, n_genes=N_GENES))["input_ids"]
        width = len(prompt) + max(map(len, answers))
        ids = torch.as_tensor([prompt + a + [0] * (width - len(prompt) - len(a)) for a in answers])
        with torch.no_grad():
            logp = c2s.model(input_ids=ids).logits.log_softmax(-1)
        out.append(
            [float(sum(logp[k, len(prompt) - 1 + j, t] for j, t in enumerate(a))) for k, a in enumerate(answers)]
        )
    return np.array(out)


@pytest.fixture(scope="module")
def full_loglik(_short_sentences, tiny) -> np.ndarray:
    return full_sequence_loglik(tiny, _short_sentences, LONG_LABELS)


@pytest.mark.parametrize("max_packed", [None, 4], ids=["one pass", "three passes"])
def test_constrained_scores_match_full_sequences(short_sentences, tiny, full_loglik, max_packed, monkeypatch):
    answers = [tiny.tokenizer(prompts.answer(label), add_special_tokens=False)["input_ids"] for label in LONG_LABELS]
    assert list(map(len, answers)) == [2, 3, 5, 4]
    if max_packed is not None:  # [A549, H1975 cell], [H2228 lung cell line], [HCC827 cell line]
        monkeypatch.setattr(_candidates, "LOGIT_BUDGET", 5 * len(tiny.tokenizer) * max_packed)
        groups = _candidates.pack_candidates(answers, pad_id=0, device=torch.device("cpu"), max_packed=max_packed)
        assert [len(g.first) for g in groups] == [2, 1, 1]

    words = _utils.cell_words(short_sentences, tiny, n_genes=N_GENES, mod=None)
    ids = _runtime.tokenize(tiny.tokenizer, _utils.prediction_prompts(words, n_genes=N_GENES, organism="Homo sapiens"))
    assert len(set(map(len, ids))) == 10  # batches of 5 mix prompt lengths: left padding at work
    loglik = _annotate.score_labels(tiny, ids, LONG_LABELS, batch_size=5)
    np.testing.assert_allclose(loglik, full_loglik, atol=1e-4)

    sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LONG_LABELS, n_genes=N_GENES, batch_size=5)
    prob = softmax(full_loglik, axis=1)
    best = full_loglik.argmax(axis=1)
    assert short_sentences.obs["c2s_cell_type"].cat.categories.tolist() == sorted(set(np.array(LONG_LABELS)[best]))
    np.testing.assert_array_equal(short_sentences.obs["c2s_cell_type"].to_numpy(), np.array(LONG_LABELS)[best])
    np.testing.assert_allclose(short_sentences.obs["c2s_cell_type_score"], prob[np.arange(len(best)), best], rtol=1e-4)


def full_sentence_loglik(c2s: C2SModel, words: list[list[str]], labels: list[str]) -> np.ndarray:
    """Log-likelihood of each cell's sentence and EOS after each label's generation prompt (cells × labels): one
    forward pass per cell and label over the unpadded prompt and answer."""
    tokenizer, out = c2s.tokenizer, np.empty((len(words), len(labels)))
    for i, cell in enumerate(words):
        answer = [*tokenizer(prompts.answer(prompts.cell_sentence(cell)), add_special_tokens=False)["input_ids"]]
        answer.append(tokenizer.eos_token_id)
        for j, label in enumerate(labels):
            prompt = tokenizer(prompts.cell_type_generation(label, n_genes=len(cell)))["input_ids"]
            with torch.no_grad():
                logp = c2s.model(input_ids=torch.as_tensor([prompt + answer])).logits[0].log_softmax(-1)
            out[i, j] = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(answer))
    return out


def trained_here(c2s: C2SModel, **metadata) -> C2SModel:
    """`c2s` with the metadata of a model :func:`sc_c2s.tl.finetune` trained (a record of its training)."""
    fields = {"name": "finetuned", "labels": LABELS, "training": {"base_model": "scratch"}, **metadata}
    return C2SModel(c2s.model, c2s.tokenizer, C2SMetadata(**fields), Path("finetuned"))


def reranked_probabilities(c2s: C2SModel, adata: ad.AnnData) -> np.ndarray:
    """Probabilities of `LABELS` (cells × labels) after re-ranking each cell's top 3, from full sequences."""
    prediction = full_sequence_loglik(c2s, adata, LABELS)
    words = _utils.cell_words(adata, c2s, n_genes=N_GENES, mod=None)
    generation = full_sentence_loglik(c2s, words, LABELS)
    logp = prediction - logsumexp(prediction, axis=1, keepdims=True)
    expected = np.empty_like(logp)
    for cell, (pred, gen) in enumerate(zip(logp, generation, strict=True)):
        top = np.argsort(-pred)[:3]
        combined = pred[top] + gen[top] - logsumexp(gen[top])
        expected[cell] = np.exp(pred)
        expected[cell, top] = np.exp(pred[top]).sum() * softmax(combined)
    return expected


def test_rerank_matches_full_sequences(short_sentences, tiny):
    """A model finetune trained on both tasks re-ranks the prediction's top 3 labels by the generation task."""
    prediction = full_sequence_loglik(tiny, short_sentences, LABELS)
    expected = reranked_probabilities(tiny, short_sentences)
    best, cells = expected.argmax(axis=1), np.arange(len(expected))
    # re-ranking moves the scores of this random model by more than ten times the tolerance below
    assert np.abs(expected[cells, best] / softmax(prediction, axis=1)[cells, best] - 1).max() > 1e-3

    model = trained_here(tiny)
    for batch_size in (1, 5):
        sc_c2s.tl.annotate(short_sentences, model=model, labels=LABELS, n_genes=N_GENES, batch_size=batch_size)
        np.testing.assert_array_equal(short_sentences.obs["c2s_cell_type"].to_numpy(), np.array(LABELS)[best])
        score = short_sentences.obs["c2s_cell_type_score"]
        np.testing.assert_allclose(score, expected[cells, best], rtol=1e-4)
        assert short_sentences.uns["c2s_cell_type"]["params"]["rerank"] == 3
        assert short_sentences.uns["c2s_cell_type"]["params"]["score_temperature"] == 1.0  # none recorded


@pytest.mark.parametrize(("rerank", "temperature"), [(0, 1.5), (3, 2.5), (2, 1.0)])
def test_scores_divided_by_the_temperature_of_the_labels_reranked(short_sentences, tiny, rerank, temperature):
    """The model's temperature for that number of labels re-ranked (1 where it has none) softens the scores only."""
    model = trained_here(tiny, score_temperatures={"0": 1.5, "3": 2.5})
    out = sc_c2s.tl.annotate(short_sentences, model=model, labels=LABELS, rerank=rerank, n_genes=N_GENES, copy=True)
    assert out.uns["c2s_cell_type"]["params"]["score_temperature"] == temperature
    if rerank == 2:  # no temperature for two labels re-ranked: the scores of a model without any
        plain = sc_c2s.tl.annotate(
            short_sentences, model=trained_here(tiny), labels=LABELS, rerank=2, n_genes=N_GENES, copy=True
        )
        pd.testing.assert_frame_equal(out.obs, plain.obs)
        return
    if rerank:
        prob = reranked_probabilities(tiny, short_sentences)
    else:
        prob = softmax(full_sequence_loglik(tiny, short_sentences, LABELS), axis=1)
    best, cells = prob.argmax(axis=1), np.arange(len(prob))
    np.testing.assert_array_equal(out.obs["c2s_cell_type"].to_numpy(), np.array(LABELS)[best])
    calibrated = softmax(np.log(prob) / temperature, axis=1)
    np.testing.assert_allclose(out.obs["c2s_cell_type_score"], calibrated[cells, best], rtol=1e-4)
    assert (out.obs["c2s_cell_type_score"] < prob[cells, best]).all()  # softer


@pytest.mark.parametrize(
    ("metadata", "rerank", "expected"),
    [
        ({}, 0, 0),  # switched off
        ({}, 1, 0),  # one label: nothing to re-rank
        ({}, 9, 4),  # at most the label set
        ({"training": {}}, None, 0),  # not trained by finetune: a published checkpoint
        ({"tasks": ["cell_type_prediction"]}, None, 0),  # not trained for generation
        ({"tasks": ["cell_type_prediction", "cell_type_generation", "summary"]}, None, 3),
    ],
)
def test_labels_reranked(short_sentences, tiny, metadata, rerank, expected):
    model = trained_here(tiny, **metadata)
    out = sc_c2s.tl.annotate(
        short_sentences, model=model, labels=LONG_LABELS, rerank=rerank, n_genes=N_GENES, copy=True
    )
    assert out.uns["c2s_cell_type"]["params"]["rerank"] == expected
    if not expected:
        prediction = sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LONG_LABELS, n_genes=N_GENES, copy=True)
        pd.testing.assert_frame_equal(out.obs, prediction.obs)


def test_rerank_by_a_model_not_trained_for_generation_warns(short_sentences, tiny, scanpy_log):
    model = trained_here(tiny, tasks=["cell_type_prediction"])
    sc_c2s.tl.annotate(short_sentences, model=model, labels=LABELS, rerank=2, n_genes=N_GENES)
    assert "'finetuned' was not trained for cell-type conditioned generation" in scanpy_log.getvalue()
    assert short_sentences.uns["c2s_cell_type"]["params"]["rerank"] == 2


@pytest.fixture
def short_answers(monkeypatch):
    """Random models rarely write a period: cut their free answers after 6 tokens to keep tests fast."""
    monkeypatch.setattr(_annotate, "MAX_ANSWER_TOKENS", 6)


def test_batch_size_does_not_change_results(short_sentences, tiny):
    one = sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES, batch_size=1, copy=True)
    seven = sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES, batch_size=7, copy=True)
    again = sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES, batch_size=7, copy=True)
    pd.testing.assert_series_equal(one.obs["c2s_cell_type"], seven.obs["c2s_cell_type"])
    np.testing.assert_allclose(one.obs["c2s_cell_type_score"], seven.obs["c2s_cell_type_score"], rtol=1e-4)
    pd.testing.assert_frame_equal(seven.obs, again.obs)


def test_free_answers_do_not_depend_on_batch_size(short_sentences, tiny, short_answers):
    words = _utils.cell_words(short_sentences, tiny, n_genes=N_GENES, mod=None)
    ids = _runtime.tokenize(tiny.tokenizer, _utils.prediction_prompts(words, n_genes=N_GENES, organism="Homo sapiens"))
    one, one_prob = _annotate.generate_answers(tiny, ids, known=None, batch_size=1)
    seven, seven_prob = _annotate.generate_answers(tiny, ids, known=None, batch_size=7)
    assert one == seven
    np.testing.assert_allclose(one_prob, seven_prob, rtol=1e-4)


def test_free_answers_match_one_cell_at_a_time_generate(short_sentences, tiny, short_answers):
    short_sentences = short_sentences[:16].copy()
    words = _utils.cell_words(short_sentences, tiny, n_genes=N_GENES, mod=None)
    ids = _runtime.tokenize(tiny.tokenizer, _utils.prediction_prompts(words, n_genes=N_GENES, organism="Homo sapiens"))
    answers, _ = _annotate.generate_answers(tiny, ids, known=None, batch_size=8)

    stop = _runtime.period_ids(tiny.tokenizer)
    assert tiny.tokenizer.convert_tokens_to_ids(".") in stop
    assert tiny.tokenizer.eos_token_id in stop
    expected = []
    for words in prompts.sentence_words(short_sentences, n_genes=N_GENES):
        prompt = tiny.tokenizer(prompts.cell_type_prediction(words, n_genes=N_GENES), return_tensors="pt")
        out = tiny.model.generate(
            input_ids=prompt["input_ids"],
            attention_mask=prompt["attention_mask"],
            max_new_tokens=_annotate.MAX_ANSWER_TOKENS,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=tiny.tokenizer.pad_token_id,
        )
        new = out[0, prompt["input_ids"].shape[1] :]
        expected.append(tiny.tokenizer.decode(new, skip_special_tokens=True).strip().removesuffix(".").strip())
    assert answers == expected


def test_free_answers_that_list_genes_or_are_empty_are_missing(short_sentences, tiny, monkeypatch):
    adata = short_sentences[:6].copy()
    a, b, c = (g.upper() for g in adata.uns["c2s"]["genes"][:3])
    answers = ["A549", "H1975 cell", f"{a} {b} {c}", f"{a} A549", f"{a}, {b} and", ""]
    monkeypatch.setattr(_annotate, "generate_answers", lambda *_, **__: (answers, np.full(6, 0.5)))
    with (
        pytest.warns(UserWarning, match=r"^2 of 6 answers are lists of genes, not cell types"),
        pytest.warns(UserWarning, match=r"^1 of 6 answers are empty; they are missing"),
    ):
        sc_c2s.tl.annotate(adata, model=tiny, n_genes=N_GENES)
    # half the words genes is not "most": `{a} A549` stays an answer
    assert adata.obs["c2s_cell_type"].tolist()[:2] == ["A549", "H1975 cell"]
    assert adata.obs["c2s_cell_type"].isna().tolist() == [False, False, True, False, True, True]
    assert adata.obs["c2s_cell_type"].cat.categories.tolist() == sorted(["A549", "H1975 cell", f"{a} A549"])
    np.testing.assert_array_equal(adata.obs["c2s_cell_type_score"], [0.5, 0.5, np.nan, 0.5, np.nan, np.nan])


def test_free_answers_that_list_genes_of_the_models_vocabulary_are_missing(short_sentences, tiny, monkeypatch):
    """On data unlike its training data, a model continues sentences with genes of its own training data, which this
    data lacks: such an answer became every cell's cell type, with a score, and no warning."""
    adata = short_sentences[:2].copy()
    answers = ["OTHER1 OTHER2 OTHER3", "A549"]
    monkeypatch.setattr(_annotate, "generate_answers", lambda *_, **__: (answers, np.full(2, 0.5)))
    vocabulary = [*adata.uns["c2s"]["genes"], "OTHER1", "OTHER2", "OTHER3"]  # genes this data lacks
    with pytest.warns(UserWarning, match=r"^1 of 2 answers are lists of genes"):
        sc_c2s.tl.annotate(adata, model=trained_here(tiny, vocabulary=vocabulary), n_genes=N_GENES)
    assert adata.obs["c2s_cell_type"].tolist() == [np.nan, "A549"]


def test_a_set_of_labels_is_taken_in_sorted_order():
    """A set was taken in its iteration order, which changes with the hash seed: the recorded labels, and the scores'
    last digits (labels are scored in batches in that order), changed from one session to the next."""

    class ReverseSet(set):
        def __iter__(self):
            return iter(sorted(super().__iter__(), reverse=True))

    assert _annotate.label_set(ReverseSet({"B", "A", "C"})) == ["A", "B", "C"]
    assert _annotate.label_set(["B", "A", "C"]) == ["B", "A", "C"]  # a list keeps its order


def test_labels_of_the_model_are_taken_as_they_were_trained(short_sentences, tiny):
    """A model trained before labels with a space at an end were refused still annotates with its labels."""
    older = trained_here(tiny, labels=["A549 ", *LABELS[1:]])
    sc_c2s.tl.annotate(short_sentences, model=older, labels="model", n_genes=N_GENES)
    assert set(short_sentences.obs["c2s_cell_type"]) <= {"A549 ", *LABELS[1:]}
    with pytest.raises(ValueError, match=r"without a space at either end; got \['A549 '\]"):
        sc_c2s.tl.annotate(short_sentences, model=older, labels=["A549 ", *LABELS[1:]], n_genes=N_GENES)


def test_free_answers_that_are_labels_of_the_model_are_kept(short_sentences, tiny, monkeypatch):
    """A label named after marker genes is a label of the model, not a cell sentence continued."""
    adata = short_sentences[:2].copy()
    a, b = (g.upper() for g in adata.uns["c2s"]["genes"][:2])
    answers = [f"{a} {b} Mono", f"{b} {a} Mono"]
    monkeypatch.setattr(_annotate, "generate_answers", lambda *_, **__: (answers, np.full(2, 0.5)))
    with pytest.warns(UserWarning, match=r"^1 of 2 answers are lists of genes"):
        sc_c2s.tl.annotate(adata, model=trained_here(tiny, labels=[*LABELS, f"{a} {b} Mono"]), n_genes=N_GENES)
    assert adata.obs["c2s_cell_type"].tolist() == [f"{a} {b} Mono", np.nan]


@pytest.mark.parametrize(
    ("written", "known", "expected"),
    [
        (" Ex. neuron. H838.", True, 4),  # Ex . neuron .
        (" Ex. neuron. H838.", False, 2),  # Ex .
        (" B cell.. H838.", True, 3),  # B cell. .
        (" H838. Ex.", True, 2),  # H838 .
        (" Ex. H838. neuron.", True, 4),  # Ex . H838 .: the start of no known answer
        (" Ex. neuron", True, 3),  # cut by `max_new_tokens`
        (" In. In. neuron.", True, 2),  # In .: the longest known answer passed, not the first
        (" In. neuron. H838.", True, 4),  # In . neuron .
    ],
)
def test_answer_length_passes_the_periods_inside_known_answers(written, known, expected):
    labels = ["Ex. neuron", "B cell.", "H838", "In", "In. neuron"]
    tokenizer = build_tokenizer(["CD3D"], labels)
    tokens = np.array(tokenizer(written, add_special_tokens=False)["input_ids"])
    answers = {prompts.answer(label, prefix="") for label in labels} if known else set()
    periods = _runtime.period_ids(tokenizer)
    assert _annotate.answer_length(tokenizer, tokens, periods=periods, known=answers) == expected
    with_eos = np.array([*tokenizer(" Ex.", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, 0])
    assert _annotate.answer_length(tokenizer, with_eos, periods=periods, known=answers) == (3 if known else 2)


def test_a_word_level_tokenizer_keeps_the_space_on_a_tie(short_sentences, tiny):
    """Both forms of the answer read alike to a word-level tokenizer: the tie goes to the space, as documented."""
    undetected = C2SModel(
        tiny.model, tiny.tokenizer, C2SMetadata(name="undetected", labels=LABELS, answer_prefix=None), Path("u")
    )
    assert undetected.metadata.answer_prefix is None
    words = _utils.cell_words(short_sentences, undetected, n_genes=8, mod=None)
    ids = _runtime.tokenize(tiny.tokenizer, _utils.prediction_prompts(words, n_genes=8, organism="Homo sapiens"))
    _annotate.score_labels(undetected, ids, LABELS, batch_size=4)
    assert undetected.metadata.answer_prefix == " "


def test_trained_model_names_cell_lines(trained):
    c2s, adata, held_out = trained
    adata = adata[held_out].copy()
    sc_c2s.tl.annotate(adata, model=c2s, labels="model", n_genes=8, key_added="constrained")
    sc_c2s.tl.annotate(adata, model=c2s, n_genes=8, key_added="free")

    truth = adata.obs["cell_type"].astype(str)
    constrained, free = adata.obs["constrained"].astype(str), adata.obs["free"].astype(str)
    assert set(free) <= set(LABELS)  # the answers parse to exact cell-line names
    assert (free == constrained).mean() > 0.95
    assert (constrained == truth).mean() > 0.7  # largest class: 24 %
    assert adata.uns["constrained"]["params"]["labels"] == LABELS
    assert ((adata.obs["free_score"] > 0) & (adata.obs["free_score"] <= 1)).all()


def test_trained_labels_with_periods_or_genes_are_written_whole(_namer_cells, one_torch_thread):
    """Free answers were cut at a label's own period ("Ex. A549" → "Ex", "H1975 cell." → "H1975 cell"), and a label
    named after genes was dropped as a list of genes. With such labels the model now writes on to its end of
    sequence, and the answer ends at the first period that ends a label or the start of none."""
    adata, held_out = _namer_cells
    a, b = (g.upper() for g in adata.uns["c2s"]["genes"][:2])
    renamed = {"A549": "Ex. A549", "H838": "In. H838", "H1975": "H1975 cell.", "H2228": f"{a} {b} H2228"}
    labels = [renamed.get(label, label) for label in LABELS]
    truth = adata.obs["cell_type"].astype(str).map(lambda label: renamed.get(label, label))
    c2s = train_namer(adata[~held_out], labels, truth[~held_out], name="renamed", steps=100)
    tokenizer = c2s.tokenizer
    assert tokenizer.tokenize(" Ex. A549.") == ["Ex", ".", "A549", "."]  # the label's own period is a token

    adata = adata[held_out].copy()
    sc_c2s.tl.annotate(adata, model=c2s, labels="model", n_genes=8, key_added="constrained")
    sc_c2s.tl.annotate(adata, model=c2s, n_genes=8, key_added="free")  # no warning of lists of genes
    constrained, free = adata.obs["constrained"].astype(str), adata.obs["free"].astype(str)
    assert set(renamed.values()) <= set(free)
    assert (free == constrained).mean() > 0.9
    assert (constrained == truth[held_out]).mean() > 0.7

    for words, answer in zip(prompts.sentence_words(adata[:30], n_genes=8), free, strict=False):
        prompt = tokenizer(prompts.cell_type_prediction(words, n_genes=8), return_tensors="pt")
        out = c2s.model.generate(
            input_ids=prompt["input_ids"],
            attention_mask=prompt["attention_mask"],
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=0,
        )
        written = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == _annotate.parse_answer(written)  # one label and its period, then EOS


def test_results_and_params(short_sentences, tiny, container, scanpy_log):
    data = container.wrap(short_sentences)
    x = short_sentences.X.copy()
    sc_c2s.tl.annotate(data, model=tiny, labels=LABELS, n_genes=N_GENES, key_added="ct")

    rna = container.rna(data)
    assert isinstance(rna.obs["ct"].dtype, pd.CategoricalDtype)
    assert set(rna.obs["ct"]) <= set(LABELS)
    assert rna.obs["ct_score"].between(1 / len(LABELS), 1).all()
    assert rna.uns["ct"]["params"] == {
        "mode": "constrained",
        "labels": LABELS,
        "rerank": 0,
        "score_temperature": 1.0,
        "n_genes": N_GENES,
        "organism": "Homo sapiens",
        "model": "tiny",
        "path": "tiny",
        "sha256": {},
    }
    assert (rna.X != x).nnz == 0
    if container.is_mudata:
        assert data.obs["rna:ct"].astype(str).tolist() == rna.obs["ct"].astype(str).tolist()
        assert data.obs["rna:ct"].dtype == rna.obs["ct"].dtype
    assert "'ct', " in scanpy_log.getvalue()
    assert "'ct_score', " in scanpy_log.getvalue()


def test_free_params_and_h5ad_round_trip(short_sentences, tiny, tmp_path, short_answers):
    with pytest.warns(UserWarning, match="lists of genes"):  # a random model continues the sentences
        sc_c2s.tl.annotate(short_sentences, model=tiny, n_genes=N_GENES, organism="Mus musculus")
    assert short_sentences.uns["c2s_cell_type"]["params"]["mode"] == "free"
    assert "labels" not in short_sentences.uns["c2s_cell_type"]["params"]
    assert short_sentences.uns["c2s_cell_type"]["params"]["organism"] == "Mus musculus"
    short_sentences.write_h5ad(tmp_path / "annotated.h5ad")
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    pd.testing.assert_series_equal(back.obs["c2s_cell_type"], short_sentences.obs["c2s_cell_type"])
    assert back.uns["c2s_cell_type"]["params"]["organism"] == "Mus musculus"


def test_organism_and_casing_reach_the_prompt(short_sentences, tiny):
    human = sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES, copy=True)
    mouse = sc_c2s.tl.annotate(
        short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES, organism="Mus musculus", copy=True
    )
    assert not np.allclose(human.obs["c2s_cell_type_score"], mouse.obs["c2s_cell_type_score"])

    short_sentences.uns["c2s"]["genes"] = [g.lower() for g in short_sentences.uns["c2s"]["genes"]]
    words = prompts.sentence_words(short_sentences, n_genes=N_GENES)
    assert _utils.cell_words(short_sentences, tiny, n_genes=N_GENES, mod=None) == [
        [w.upper() for w in c] for c in words
    ]
    lower = C2SModel(tiny.model, tiny.tokenizer, C2SMetadata(name="lower", upper_case=False), Path("lower"))
    assert _utils.cell_words(short_sentences, lower, n_genes=N_GENES, mod=None) == words


def test_cells_of_which_the_model_knows_no_gene_are_announced(tiny, scanpy_log):
    """Cells of another dataset, mixed with the model's own kind, read as the same unknown words: they got one
    embedding and one label among them (with a higher score than any real cell's), without a word, while the share
    of unknown words of all cells stayed under the warning's threshold."""
    X = np.array([[5, 3, 0, 0], [0, 0, 4, 2], [0, 3, 5, 0], [1, 2, 0, 0]], dtype=np.float32)
    adata = ad.AnnData(X, var=pd.DataFrame(index=["A", "B", "C", "D"]))
    sc_c2s.pp.to_sentences(adata, rank_fit=False)
    model = trained_here(tiny, vocabulary=["A", "B"])
    words = _utils.cell_words(adata, model, n_genes=4, mod=None)
    assert words == [["A", "B"], ["C", "D"], ["C", "B"], ["B", "A"]]
    log = scanpy_log.getvalue()
    assert "1 cells have no sentence gene in the vocabulary of 'finetuned'" in log
    assert "of the sentence genes are not in the vocabulary" not in log  # 3 of 8: under the share warned of


def test_n_genes_defaults_to_the_models(short_sentences, tiny):
    """A model trained on 12-gene sentences used to be prompted with 200 genes unless `n_genes` said otherwise."""
    twelve = C2SModel(tiny.model, tiny.tokenizer, C2SMetadata(name="tiny", n_genes=N_GENES), Path("tiny"))
    annotated = sc_c2s.tl.annotate(short_sentences, model=twelve, labels=LABELS, copy=True)
    given = sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES, copy=True)
    assert annotated.uns["c2s_cell_type"]["params"]["n_genes"] == N_GENES
    pd.testing.assert_frame_equal(annotated.obs, given.obs)
    embedded = sc_c2s.tl.embed(short_sentences, model=twelve, copy=True)
    given = sc_c2s.tl.embed(short_sentences, model=tiny, n_genes=N_GENES, copy=True)
    assert embedded.uns["X_c2s"]["params"]["n_genes"] == N_GENES
    np.testing.assert_array_equal(embedded.obsm["X_c2s"], given.obsm["X_c2s"])


def test_copy_leaves_input_untouched(short_sentences, tiny):
    before = short_sentences.copy()
    out = sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES, copy=True)
    assert "c2s_cell_type" in out.obs
    assert "c2s_cell_type" not in short_sentences.obs
    assert short_sentences.uns.keys() == before.uns.keys()


def test_model_training_flag_is_restored(short_sentences, tiny):
    tiny.model.train()
    try:
        sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES)
        assert tiny.model.training
    finally:
        tiny.model.eval()


def test_bfloat16_model(short_sentences, tiny):
    """The padding and candidate masks follow the model's dtype (bf16, as on a GPU)."""
    short_sentences = short_sentences[:12].copy()
    half = C2SModel(copy.deepcopy(tiny.model).to(torch.bfloat16), tiny.tokenizer, tiny.metadata, Path("bf16"))
    a = sc_c2s.tl.annotate(short_sentences, model=half, labels=LONG_LABELS, n_genes=N_GENES, copy=True)
    b = sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LONG_LABELS, n_genes=N_GENES, copy=True)
    assert a.uns["c2s_cell_type"]["params"]["path"] == "bf16"
    np.testing.assert_allclose(a.obs["c2s_cell_type_score"], b.obs["c2s_cell_type_score"], atol=0.05)


def test_parse_answer():
    assert _annotate.parse_answer(" CD4 T cell.") == "CD4 T cell"
    assert _annotate.parse_answer("H1975 .\n") == "H1975"
    assert _annotate.parse_answer(" B cell") == "B cell"
    assert _annotate.parse_answer(" .") == ""


@pytest.mark.parametrize("label", ["T cells, CD4+", "pancreas, embryonic", "B cell: naive", "A549"])
def test_free_answers_read_back_as_trained(label):
    """A scratch model's answer "T cells, CD4+" decoded as "T cells , CD4+", which matched no label."""
    tokenizer = build_tokenizer(["CD3D"], [label])
    written = tokenizer(prompts.answer(label), add_special_tokens=False)["input_ids"]
    assert _annotate.parse_answer(tokenizer.decode(written, skip_special_tokens=True)) == label


def test_without_sentences(tiny):
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    with pytest.raises(KeyError, match=r"to_sentences"):
        sc_c2s.tl.annotate(adata, model=tiny)
    assert not adata.obs.columns.size
    assert not adata.uns


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": "A549"}, r'"model" or None'),
        ({"labels": []}, r"non-empty"),
        ({"labels": ["A549", " "]}, r"non-empty"),
        ({"labels": ["A549", "H1975", "A549"]}, r"more than once"),
        ({"labels": ["A549", "H1975", "H1975 "]}, r"without a space at either end; got \['H1975 '\]"),
        # accepted without re-ranking, and refused by the prompt for re-ranking as `cell_type`, after the scoring
        ({"labels": ["A549", "CD19+\nB"]}, r"`labels` must be non-empty strings of one line"),
        ({"labels": ["A549", "CD19+\rB"]}, r"`labels` must be non-empty strings of one line"),
        # the longer answer's likelihood is the shorter one's times that of what follows: it could never win
        ({"labels": ["A549. H1975", "A549"]}, r"The answer to 'A549' begins the answer to 'A549. H1975' for 'tiny'"),
        ({"labels": ["A549", "lymphocyte", "monocyte"]}, r"'lymphocyte' and 'monocyte' have words unknown to 'tiny'"),
        ({"n_genes": 0}, r"positive integer"),
        ({"batch_size": 0}, r"positive integer"),
        ({"organism": "Danio rerio"}, r"organism"),
        ({"rerank": -1, "labels": LABELS}, r"`rerank` must be a number of labels \(0 to switch re-ranking off\)"),
        ({"rerank": True, "labels": LABELS}, r"`rerank` must be a number of labels"),
        ({"rerank": 2.0, "labels": LABELS}, r"`rerank` must be a number of labels"),
        ({"rerank": 3}, r"`rerank=3` re-ranks candidate labels, but `labels=None` lets the model write"),
        (
            {"n_genes": 200, "labels": LABELS},
            r"reads at most 128; lower `n_genes`\.$",
        ),
    ],
)
def test_bad_arguments(short_sentences, tiny, kwargs, match):
    if kwargs.get("n_genes") == 200:
        sc_c2s.pp.to_sentences(short_sentences, gene_symbols="gene_symbol", rank_fit=False)
    with pytest.raises(ValueError, match=match):
        sc_c2s.tl.annotate(short_sentences, model=tiny, **{"n_genes": N_GENES, **kwargs})
    assert "c2s_cell_type" not in short_sentences.obs


def test_warnings(short_sentences, tiny, scanpy_log):
    one_gene = [prompts.sentence_words(short_sentences, n_genes=N_GENES)[0][0]]  # all other words unknown
    few = C2SModel(tiny.model, tiny.tokenizer, C2SMetadata(name="few", vocabulary=one_gene), Path("few"))
    sc_c2s.tl.annotate(short_sentences, model=few, labels=["A549", "lymphocyte"], n_genes=N_GENES)
    log = scanpy_log.getvalue()
    assert "% of the sentence genes are not in the vocabulary of 'few': do the sentences use the gene names" in log
    assert "1 labels have words unknown to 'few' (e.g. ['lymphocyte'])" in log


@pytest.mark.parametrize("verb", [sc_c2s.tl.annotate, sc_c2s.tl.embed])
def test_sentences_without_a_gene_of_the_vocabulary_are_refused(short_sentences, tiny, verb):
    """All 38 cells used to get the same confident label from prompts of unknown words, with a logged warning only."""
    ensembl = C2SModel(tiny.model, tiny.tokenizer, C2SMetadata(name="ids", vocabulary=["ENSG0001"]), Path("ids"))
    before = short_sentences.copy()
    with pytest.raises(
        ValueError, match=r"None of the sentence genes is in the vocabulary of 'ids' \(e\.g\. '[A-Z0-9-]+'\)"
    ):
        verb(short_sentences, model=ensembl, n_genes=N_GENES)
    assert short_sentences.obs.equals(before.obs)
    assert short_sentences.obsm.keys() == before.obsm.keys()
    assert short_sentences.uns.keys() == before.uns.keys()


def test_sentences_ranked_with_fewer_genes_than_n_genes_warn_once(short_sentences, tiny, scanpy_log):
    """Prompts used to say "a list of 20 gene names" over sentences ranked with 12, and record 20, silently."""
    sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES)
    assert "were ranked with" not in scanpy_log.getvalue()
    sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=20)
    warning = (
        "WARNING: The sentences were ranked with `n_genes=12`, fewer than the 20 genes asked for here: each cell "
        "gives at most 12 genes, though prompts say 20. Rank them again with "
        "`sc_c2s.pp.to_sentences(adata, n_genes=20)`, or pass `n_genes=12` here."
    )
    assert scanpy_log.getvalue().count(warning) == 1
    assert short_sentences.uns["c2s_cell_type"]["params"]["n_genes"] == 20


def test_model_not_trained_for_cell_type_prediction_warns(short_sentences, tiny, scanpy_log):
    """annotate used to ignore the model's tasks and prompt style, which generate and the other verbs warn about."""
    sc_c2s.tl.annotate(short_sentences, model=tiny, labels=LABELS, n_genes=N_GENES)
    assert "was not trained for" not in scanpy_log.getvalue()
    generator = C2SMetadata(name="generator", labels=LABELS, tasks=["cell_type_generation"])
    model = C2SModel(tiny.model, tiny.tokenizer, generator, Path())
    sc_c2s.tl.annotate(short_sentences, model=model, labels=LABELS, n_genes=N_GENES)
    assert "WARNING: 'generator' was not trained for cell-type prediction; expect poor labels." in scanpy_log.getvalue()
    legacy = C2SMetadata(name="legacy", labels=LABELS, prompt_style="c2s-legacy")
    model = C2SModel(tiny.model, tiny.tokenizer, legacy, Path())
    sc_c2s.tl.annotate(short_sentences, model=model, labels=LABELS, n_genes=N_GENES)
    assert (
        "WARNING: 'legacy' was not trained for cell-type prediction in the prompt format of `sc_c2s.prompts` (its "
        "prompt style is 'c2s-legacy'); expect poor labels."
    ) in scanpy_log.getvalue()


def test_model_without_labels(short_sentences, tiny):
    bare = C2SModel(tiny.model, tiny.tokenizer, C2SMetadata(name="bare"), Path("bare"))
    with pytest.raises(ValueError, match=r"carries no label set"):
        sc_c2s.tl.annotate(short_sentences, model=bare, labels="model", n_genes=N_GENES)


@pytest.mark.parametrize("labels", [None, LABELS])
def test_empty_sentences_warn(short_sentences, tiny, labels):
    """Cells with empty sentences used to be labelled without a word (while `embed` refuses them)."""
    short_sentences.obsm["c2s_genes"][[1, 4]] = -1
    gene_lists = pytest.warns(UserWarning, match="lists of genes") if labels is None else contextlib.nullcontext()
    with gene_lists, pytest.warns(UserWarning, match=r"2 cells have empty sentences .*sc\.pp\.filter_cells"):
        sc_c2s.tl.annotate(short_sentences, model=tiny, labels=labels, n_genes=N_GENES)
    assert short_sentences.obs["c2s_cell_type"].notna().all() or labels is None  # a random model lists genes


def test_single_label_warns(short_sentences, tiny):
    """`labels=["x"]` used to label every cell "x" with score 1 without a word."""
    with pytest.warns(
        UserWarning, match=r"`labels` holds a single label, so every cell is labelled 'A549' with score 1"
    ):
        sc_c2s.tl.annotate(short_sentences, model=tiny, labels=["A549"], n_genes=N_GENES)
    assert (short_sentences.obs["c2s_cell_type_score"] == 1).all()


@pytest.mark.parametrize("key_added", ["", None, 3])
def test_bad_key_added(short_sentences, tiny, key_added):
    with pytest.raises(TypeError, match=r"`key_added` must be a non-empty string"):
        sc_c2s.tl.annotate(short_sentences, model=tiny, n_genes=N_GENES, key_added=key_added)


@pytest.mark.parametrize("key_added", ["c2s", "c2s_sentence", "a/b"])
def test_key_added_of_the_package_or_with_a_slash(short_sentences, tiny, key_added):
    """`key_added="c2s"` used to replace `uns['c2s']`, after which every verb failed; "a/b" could not be saved."""
    before = short_sentences.copy()
    with pytest.raises(ValueError, match=rf"`key_added={key_added!r}` (would replace|holds a '/')"):
        sc_c2s.tl.annotate(short_sentences, model=tiny, labels="model", n_genes=N_GENES, key_added=key_added)
    assert short_sentences.uns.keys() == before.uns.keys()
    assert list(short_sentences.uns["c2s"]["genes"]) == list(before.uns["c2s"]["genes"])
    assert short_sentences.obs.columns.tolist() == before.obs.columns.tolist()


def test_sentences_that_do_not_match_their_genes(short_sentences, tiny):
    """Sentence indices past `uns['c2s']['genes']` used to fail with numpy's IndexError."""
    short_sentences.uns["c2s"]["genes"] = short_sentences.uns["c2s"]["genes"][:3]
    with pytest.raises(ValueError, match=r"points past the 3 genes of `uns\['c2s'\]\['genes'\]`.*to_sentences"):
        sc_c2s.tl.annotate(short_sentences, model=tiny, n_genes=N_GENES)
    with pytest.raises(ValueError, match="`n_genes` must be a positive integer or None, got -1"):
        prompts.sentence_words(short_sentences, n_genes=-1)  # used to drop the last gene silently


@pytest.mark.parametrize(
    ("verb", "kwargs"),
    [
        (sc_c2s.tl.annotate, {}),
        (sc_c2s.tl.embed, {}),
        (sc_c2s.tl.predict_tissue, {"groupby": "cell_type"}),
        (sc_c2s.tl.summarize, {"groupby": "cell_type"}),
    ],
)
def test_a_backed_view_is_refused_before_the_model_runs(short_sentences, tmp_path, verb, kwargs):
    """The verbs ran the model over every cell, then failed to write into a view of a backed AnnData."""
    short_sentences.write_h5ad(tmp_path / "x.h5ad")
    view = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")[:5]
    # refused before the model is even looked up
    with pytest.raises(ValueError, match=r"view of a backed AnnData.*`copy=True`"):
        verb(view, model="no-such-model", **kwargs)
