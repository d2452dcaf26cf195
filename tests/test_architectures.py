"""The architectures and tokenizers of the published checkpoints, tiny and random, through the whole workflow.

Gemma 2 (C2S-Scale): a SentencePiece-style tokenizer that adds ``<bos>`` and merges tokens across words,
sliding-window and global attention layers, soft-capped logits, eager attention. Pythia (GPT-NeoX): byte-level
BPE without a padding token, saved padding on the right, an embedding wider than the tokenizer, SDPA.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

import sc_c2s
from sc_c2s import prompts
from sc_c2s.models import C2SMetadata, C2SModel, _candidates, _files, _memory, _runtime
from sc_c2s.models._words import WordConstraint, WordTrie
from sc_c2s.tl import _annotate, _embed, _samples, _sampling, _utils

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_GENES = 12  # the longest sentence of the `short_sentences` cells
LABELS = ["A549", "H1975", "H2228", "HCC827", "H838"]
#: Labels of several sub-word tokens.
LONG_LABELS = ["A549", "H1975 cell", "H2228 lung cell line", "HCC827 cell line"]
ARCHITECTURES = ["gemma2", "pythia"]
CLASSES = {"gemma2": "Gemma2ForCausalLM", "pythia": "GPTNeoXForCausalLM"}


@pytest.fixture(scope="module")
def genes(_short_sentences) -> list[str]:
    return [g.upper() for g in _short_sentences.uns["c2s"]["genes"]]


@pytest.fixture(scope="module")
def tokenizers(genes, builders) -> dict:
    labels = [*LABELS, *LONG_LABELS]
    return {"gemma2": builders.gemma_tokenizer(genes, labels), "pythia": builders.neox_tokenizer(genes, labels)}


@pytest.fixture(scope="module")
def build(builders):
    """Build a random model of an architecture for a tokenizer."""

    def build(architecture: str, tokenizer, **kwargs):
        return (builders.gemma2_model if architecture == "gemma2" else builders.neox_model)(tokenizer, **kwargs)

    return build


@pytest.fixture(scope="module")
def published(tokenizers, build, builders, tmp_path_factory) -> dict[str, Path]:
    """Each architecture saved as the published checkpoints are (sharded weights, tokenizer, no C2S metadata)."""
    return {
        name: builders.save_published(build(name, tokenizer), tokenizer, tmp_path_factory.mktemp(name))
        for name, tokenizer in tokenizers.items()
    }


@pytest.fixture(scope="module")
def in_memory(tokenizers, build):
    """A C2SModel of an architecture, built in memory, its tokenizer prepared as `load` does."""

    def in_memory(architecture: str, **kwargs) -> C2SModel:
        tokenizer = copy.deepcopy(tokenizers[architecture])
        model = build(architecture, tokenizer, **kwargs)
        _runtime.prepare_tokenizer(tokenizer, model, Path(architecture))
        return C2SModel(model, tokenizer, C2SMetadata(name=architecture, labels=LABELS), Path(architecture))

    return in_memory


@pytest.fixture
def ranked(cellbench):
    """Every 25th CellBench cell (12), ranked."""
    adata = cellbench[::25].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=N_GENES)
    return adata


def full_sequence_loglik(c2s: C2SModel, adata, labels: list[str]) -> np.ndarray:
    """Log-likelihood of each label's answer after each prompt, from one plain forward pass per cell and label
    over the prompt (with the tokenizer's special tokens) and the answer: no padding, no cache, no custom mask."""
    tokenizer, out = c2s.tokenizer, []
    answers = [tokenizer(prompts.answer(label), add_special_tokens=False)["input_ids"] for label in labels]
    for words in prompts.sentence_words(adata, n_genes=N_GENES):
        prompt = tokenizer(prompts.cell_type_prediction(words, n_genes=N_GENES))["input_ids"]
        row = []
        for answer in answers:
            with torch.no_grad():
                logp = c2s.model(input_ids=torch.as_tensor([prompt + answer])).logits[0].log_softmax(-1)
            row.append(float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))))
        out.append(row)
    return np.array(out)


def count_calls(function, calls: dict, name: str):
    def counted(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)

    return counted


def test_tokenizers_behave_like_the_published_ones(tokenizers, genes, build):
    gemma, pythia = tokenizers["gemma2"], tokenizers["pythia"]
    prompt = prompts.cell_type_prediction(genes[:3])
    assert gemma(prompt)["input_ids"][0] == gemma.bos_token_id == 2
    assert (gemma.pad_token_id, gemma.eos_token_id) == (0, 1)
    assert pythia(prompt)["input_ids"][0] != pythia.bos_token_id  # no BOS
    assert pythia.pad_token is None
    assert pythia.padding_side == "right"
    assert gemma.decode(gemma("Zellkern µ")["input_ids"], skip_special_tokens=True) == "Zellkern µ"  # byte fallback
    assert pythia.decode(pythia("Zellkern µ")["input_ids"]) == "Zellkern µ"
    # Gemma's tokens cross word boundaries: a gene's last token and the period after it are one token
    sentence = prompts.cell_sentence(genes[:5]) + "."
    assert gemma.convert_ids_to_tokens(gemma(sentence)["input_ids"])[-1] != "."
    # both have more embedding rows than tokens
    assert build("pythia", pythia).get_input_embeddings().num_embeddings > len(pythia)


@pytest.mark.parametrize(
    ("architecture", "window"),
    [("gemma2", 4096), ("gemma2", 24), ("pythia", None)],
    ids=["gemma2", "gemma2-beyond-sliding-window", "pythia"],
)
def test_constrained_scores_match_full_sequences(short_sentences, in_memory, architecture, window, monkeypatch):
    """Packed candidates under a 4-D mask where it is exact, one candidate at a time beyond a sliding window."""
    c2s = in_memory(architecture, **({"sliding_window": window} if window else {}))
    words = _utils.cell_words(short_sentences, c2s, n_genes=N_GENES, mod=None)
    ids = _runtime.tokenize(c2s.tokenizer, _utils.prediction_prompts(words, n_genes=N_GENES, organism="Homo sapiens"))
    beyond = window is not None and min(map(len, ids)) > window
    calls = {"packed": 0, "one at a time": 0}
    for path, name in ((_candidates._continuations, "packed"), (_candidates._one_at_a_time, "one at a time")):
        monkeypatch.setattr(_candidates, path.__name__, count_calls(path, calls, name))
    loglik = _annotate.score_labels(c2s, ids, LONG_LABELS, batch_size=5)
    assert (calls["packed"] == 0) == beyond
    assert (calls["one at a time"] == 0) != beyond
    full = full_sequence_loglik(c2s, short_sentences, LONG_LABELS)
    np.testing.assert_allclose(loglik, full, atol=1e-4)

    sc_c2s.tl.annotate(short_sentences, model=c2s, labels=LONG_LABELS, n_genes=N_GENES, batch_size=5)
    best = full.argmax(axis=1)
    np.testing.assert_array_equal(short_sentences.obs["c2s_cell_type"].to_numpy(), np.array(LONG_LABELS)[best])
    np.testing.assert_allclose(
        short_sentences.obs["c2s_cell_type_score"], softmax(full, axis=1)[np.arange(len(best)), best], rtol=1e-4
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_embedding_spans_the_sentence_tokens(short_sentences, in_memory, architecture):
    """The sentence's tokens are found by the characters they cover, also where a token crosses its ends."""
    c2s = in_memory(architecture)
    words = _utils.cell_words(short_sentences, c2s, n_genes=N_GENES, mod=None)
    ids, spans = _embed.sentence_tokens(c2s, words, n_genes=N_GENES, organism="Homo sapiens")
    assert ids == _runtime.tokenize(
        c2s.tokenizer, _utils.prediction_prompts(words, n_genes=N_GENES, organism="Homo sapiens")
    )
    merged = 0
    for seq, (start, end), cell in zip(ids, spans, words, strict=True):
        sentence, inside = " ".join(cell), c2s.tokenizer.decode(seq[start:end])
        assert inside.strip().removesuffix(".") == sentence
        assert sentence not in c2s.tokenizer.decode(seq[start + 1 : end])  # no token too many
        assert sentence not in c2s.tokenizer.decode(seq[start : end - 1])
        merged += inside.endswith(".")
    assert merged == (len(words) if architecture == "gemma2" else 0)  # the last gene and the period, one token

    sc_c2s.tl.embed(short_sentences, model=c2s, n_genes=N_GENES, batch_size=7)
    for i in (0, 5):
        with torch.no_grad():
            hidden = c2s.model(input_ids=torch.as_tensor([ids[i]]), output_hidden_states=True).hidden_states[-1][0]
        expected = hidden[spans[i, 0] : spans[i, 1]].mean(0).numpy()
        np.testing.assert_allclose(short_sentences.obsm["X_c2s"][i], expected, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_workflow_from_a_published_layout(ranked, published, publish, architecture, tmp_path):
    """Download (sharded) → load → annotate (free and constrained) → embed → generate → fine-tune → load."""
    name = f"tiny-{architecture}"
    publish(name, published[architecture], architecture=CLASSES[architecture])
    c2s = sc_c2s.models.load(name, device="cpu")
    tokenizer = c2s.tokenizer
    assert tokenizer.padding_side == "left"
    assert _runtime.pad_id(tokenizer) == (0 if architecture == "gemma2" else tokenizer.eos_token_id)
    assert c2s.model.config._attn_implementation == ("eager" if architecture == "gemma2" else "sdpa")
    prompt_ids = _runtime.tokenize(tokenizer, ["Cell sentence:"])[0]
    assert (prompt_ids[0] == tokenizer.bos_token_id) == (architecture == "gemma2")

    adata = ranked
    sc_c2s.tl.annotate(adata, model=c2s, n_genes=N_GENES, batch_size=5)
    assert adata.obs["c2s_cell_type_score"].between(0, 1).all()
    sc_c2s.tl.annotate(adata, model=c2s, labels=LONG_LABELS, n_genes=N_GENES, batch_size=5)
    assert set(adata.obs["c2s_cell_type"]) <= set(LONG_LABELS)
    sc_c2s.tl.embed(adata, model=c2s, n_genes=N_GENES, batch_size=5)
    assert adata.obsm["X_c2s"].shape == (12, 32)
    assert np.isfinite(adata.obsm["X_c2s"]).all()

    generated = sc_c2s.tl.generate(adata, model=c2s, cell_types={"A549": 3, "H838": 2}, n_genes=6, batch_size=4)
    words = [sentence.split() for sentence in generated.obs["c2s_sentence"]]
    assert [len(w) for w in words] == [6] * 5  # exact length
    assert all(len(set(w)) == len(w) for w in words)  # unique genes
    assert (generated.obs["n_valid_genes"] == 6).all()  # and genes only, with genes of several tokens each
    assert generated.uns["c2s_generate"]["params"]["unique_genes"]

    adata.obs["cell_line"] = adata.obs["cell_type"].astype(str)
    path = sc_c2s.tl.finetune(
        adata,
        label_key="cell_line",
        base_model=name,
        output_dir=tmp_path / "finetuned",
        n_genes=N_GENES,
        epochs=1,
        batch_size=4,
        eval_fraction=0.25,
        device="cpu",
    )
    finetuned = sc_c2s.models.load(path, device="cpu")
    assert finetuned.metadata.training["base_model"] == name
    sc_c2s.tl.annotate(adata, model=finetuned, labels="model", n_genes=N_GENES)
    assert set(adata.obs["c2s_cell_type"]) <= set(adata.obs["cell_line"])


def test_word_constraint_writes_distinct_words_of_several_tokens():
    """Words 0: [5, 6], 1: [5, 7], 2: [8]; token 9 ends the sentence, 0 pads."""
    trie = WordTrie([[5, 6], [5, 7], [8], [8]], n_logits=10, stop_ids=[9], device=torch.device("cpu"))
    assert len(trie) == 3  # the repeated word once
    words = WordConstraint(trie, 2, n_words=2)

    def allowed() -> list[list[int]]:
        return [row.nonzero()[:, 0].tolist() for row in words.allowed()]

    assert allowed() == [[5, 8], [5, 8]]  # begin a word; no stop before a word
    words.advance(torch.tensor([5, 8]))
    assert allowed() == [[6, 7], [5]]  # row 0 finishes its word; row 1's word [8] is done and not begun again
    words.advance(torch.tensor([6, 5]))
    assert allowed() == [[5, 8], [6, 7]]  # row 0 may begin [5, 7] but not [5, 6] again, nor stop before two words
    words.advance(torch.tensor([5, 7]))
    assert allowed() == [[7], [9]]  # row 1 has two words: only the end remains
    words.advance(torch.tensor([7, 9]))
    assert allowed() == [[9], [9]]

    free = WordConstraint(trie, 1)  # any number of words: stop after any complete word
    free.advance(torch.tensor([8]))
    assert free.allowed()[0].nonzero()[:, 0].tolist() == [5, 9]


def test_word_constraint_spells_the_first_word_its_own_way():
    """Words 0: [5, 6], first [3, 6]; 1: [8], first [4]; token 9 ends the sentence. An answer that follows its prompt
    without a space spells its first word otherwise, and a word is written once in either spelling."""
    trie = WordTrie([[5, 6], [8]], n_logits=10, stop_ids=[9], device=torch.device("cpu"), opening=[[3, 6], [4]])
    assert (len(trie), trie.n_words) == (4, 2)
    words = WordConstraint(trie, 2, n_words=2)

    def allowed() -> list[list[int]]:
        return [row.nonzero()[:, 0].tolist() for row in words.allowed()]

    assert allowed() == [[3, 4], [3, 4]]  # the first word in its own spelling only
    words.advance(torch.tensor([3, 4]))
    assert allowed() == [[6], [5]]  # row 1 wrote word 1 (as [4]): word 0 follows, spelt after a space, not [8]
    words.advance(torch.tensor([6, 5]))
    assert allowed() == [[8], [6]]  # row 0 wrote word 0 (as [3, 6]): word 1 follows, not [5, 6] again
    words.advance(torch.tensor([8, 6]))
    assert allowed() == [[9], [9]]

    free = WordConstraint(trie, 1)
    free.advance(torch.tensor([4]))
    assert free.allowed()[0].nonzero()[:, 0].tolist() == [5, 9]  # word 1 written: word 0 after a space, or the end


def first_tokens(c2s: C2SModel, genes, *, space: bool) -> set[int]:
    """The first token of each gene, spelt after a space or not."""
    texts = [(" " if space else "") + prompts.cell_sentence([gene]) for gene in genes]
    return {ids[0] for ids in _runtime.tokenize(c2s.tokenizer, texts, special_tokens=False)}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_sentence_without_a_space_before_it_spells_its_first_gene_as_in_training(
    ranked, in_memory, architecture, monkeypatch
):
    """The published fine-tuning code joins prompt and answer with nothing between: a sub-word tokenizer spells the
    first gene of a sentence otherwise (``CD``, ``74``, not ``ĠCD``, ``74``). Generation spelt every gene as after a
    space, and exact lengths counted a first gene spelt without one as no word."""
    c2s = in_memory(architecture)
    c2s.metadata.answer_prefix = ""
    written = []
    texts = _sampling._texts

    def capture(tokenizer, tokens, stop_ids):
        written.extend(tokens[:, 0].tolist())
        return texts(tokenizer, tokens, stop_ids)

    monkeypatch.setattr(_sampling, "_texts", capture)
    genes = ranked.uns["c2s"]["genes"]
    opening, spaced = first_tokens(c2s, genes, space=False), first_tokens(c2s, genes, space=True)
    assert opening.isdisjoint(spaced)
    generated = sc_c2s.tl.generate(ranked, model=c2s, cell_types={"A549": 4, "H838": 4}, n_genes=6, batch_size=4)
    assert set(written) <= opening
    words = [sentence.split() for sentence in generated.obs["c2s_sentence"]]
    assert [len(w) for w in words] == [6] * 8
    assert all(len(set(w)) == len(w) for w in words)  # the first gene is not written again, spelt after a space
    assert (generated.obs["n_valid_genes"] == 6).all()

    free = sc_c2s.tl.generate(ranked, model=c2s, cell_types={"A549": 8}, n_genes=6, unique_genes=False, batch_size=4)
    lengths = [len(s.split()) for s in free.obs["c2s_sentence"]]
    assert max(lengths) == 6  # not 7 (fewer where this random model's words use up the token budget)


@pytest.mark.parametrize("prefix", [" ", ""])
def test_generation_detects_the_answer_prefix_by_the_first_gene(ranked, in_memory, prefix, scanpy_log):
    """A checkpoint without `answer_prefix` writes its first gene in the form its next token after the prompt is
    likelier in; the choice is kept for later calls."""
    c2s = in_memory("pythia")
    c2s.metadata.answer_prefix = None
    genes = ranked.uns["c2s"]["genes"]
    likely = first_tokens(c2s, genes, space=prefix == " ")
    with torch.no_grad():  # every position's hidden state the first unit vector: the logits its column of weights
        norm = c2s.model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1
        c2s.model.get_output_embeddings().weight[:, 0] = 0
        c2s.model.get_output_embeddings().weight[sorted(likely), 0] = 5
    # the default batch size: detection asked a GPU for its free memory on the CPU, before the batch was sized
    sc_c2s.tl.generate(ranked, model=c2s, cell_types={"A549": 2}, n_genes=4)
    assert c2s.metadata.answer_prefix == prefix
    how = "without" if prefix == "" else "after"
    assert scanpy_log.getvalue().count(f"sentences follow the prompt {how} a space") == 1
    sc_c2s.tl.generate(ranked, model=c2s, cell_types={"A549": 2}, n_genes=4, batch_size=2)
    assert scanpy_log.getvalue().count("records no answer prefix") == 1


def test_a_first_gene_spelt_its_own_way_has_room_and_no_stop_inside():
    """Its spelling may take more tokens, and hold a token ending in a period that ends sentences where no gene
    spelt after a space holds it (``CM4.2`` as ``C``, ``M4.``, ``2``): the context was checked before the budget grew,
    and a sentence stopped inside its first gene."""
    genes = [[5], [8], [9]]  # three genes of one token each: sentences of 3 genes take up to 6 new tokens
    budget = {"max_new_tokens": 6, "gene_tokens": genes, "stop_ids": [0, 7, 11], "extra_tokens": 0}
    _sampling.spell_first(budget, [[3, 7], [4], [10]], eos_id=0)
    assert (budget["max_new_tokens"], budget["extra_tokens"], budget["stop_ids"]) == (7, 1, [0, 11])

    config = SimpleNamespace(max_position_embeddings=10)
    c2s = SimpleNamespace(model=SimpleNamespace(config=config), name="tiny")
    budget.update(tokens_per_gene=1.0, n_distinct=3)
    _sampling.check_room(c2s, [[1, 2, 3]], budget, n_genes=3, unique_genes=True)  # 3 + 7 tokens fit in 10
    config.max_position_embeddings = 8  # 2 genes take 5 new tokens and 1 more for the first: they do not fit
    with pytest.raises(ValueError, match=r"up to 7 tokens\) do not fit in the 8 tokens .*`n_genes=1`"):
        _sampling.check_room(c2s, [[1, 2, 3]], budget, n_genes=3, unique_genes=True)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prompts_and_answers_are_tokenised_as_in_training(tokenizers, genes, architecture):
    """The prompt has the tokenizer's special tokens (Gemma's `<bos>`), the answer none, and EOS ends a sample."""
    tokenizer, tasks = tokenizers[architecture], ("cell_type_prediction", "cell_type_generation")
    kwargs = {"organism": "Homo sapiens", "upper": True}
    samples = _samples.encode(tokenizer, [genes[:5]], ["H1975 cell"], tasks=tasks, max_length=1024, **kwargs)
    for task, ids, n_prompt in zip(tasks, samples.input_ids, samples.n_prompt, strict=True):
        prompt, answer = _samples.texts(task, genes[:5], "H1975 cell", **kwargs)
        prompt_ids, answer_ids = (
            tokenizer(prompt)["input_ids"],
            tokenizer(answer, add_special_tokens=False)["input_ids"],
        )
        assert ids.tolist() == [*prompt_ids, *answer_ids, tokenizer.eos_token_id]
        assert n_prompt == len(prompt_ids)
        n_bos = int((ids == tokenizer.bos_token_id).sum())
        if architecture == "gemma2":
            assert ids[0] == tokenizer.bos_token_id
            assert n_bos == 1
        else:  # Pythia's BOS is its EOS: only the one that ends the sample
            assert ids[0] != tokenizer.bos_token_id
            assert n_bos == 1
    # the answers of constrained annotation have no BOS in front either
    answers = _runtime.tokenize(tokenizer, [prompts.answer(label) for label in LABELS], special_tokens=False)
    assert all(tokenizer.bos_token_id not in ids for ids in answers)


def test_sentencepiece_tokenizer_model_alone(
    short_sentences, genes, builders, tmp_path, monkeypatch, checkpoint_server
):
    """The published Gemma-2 checkpoints have a SentencePiece `tokenizer.model` and no `tokenizer.json`."""
    sentencepiece = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    path = tmp_path / "gemma-spm"
    path.mkdir()
    spm = builders.sentencepiece_model(genes, LABELS)
    (path / "tokenizer.model").write_bytes(spm)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    builders.gemma2_model(AutoTokenizer.from_pretrained(path)).save_pretrained(path, max_shard_size="50KB")
    c2s = sc_c2s.models.load(path, device="cpu")
    prompt = prompts.cell_type_prediction(genes[:4])
    reference = sentencepiece.SentencePieceProcessor(model_proto=spm)
    assert _runtime.tokenize(c2s.tokenizer, [prompt])[0] == [2, *reference.encode(prompt)]  # <bos>, then the same
    sc_c2s.tl.annotate(short_sentences, model=c2s, labels=LONG_LABELS, n_genes=N_GENES)
    sc_c2s.tl.embed(short_sentences, model=c2s, n_genes=N_GENES)

    # a download cut short, or an empty file: transformers asked for tiktoken; fetch kept it as good
    for broken in (spm[: len(spm) // 2], b""):
        (path / "tokenizer.model").write_bytes(broken)
        assert _files.file_problem(path / "tokenizer.model") == "is not a SentencePiece model"
        with pytest.raises(sc_c2s.models.BrokenCheckpointError, match=r"tokenizer\.model .*is not a SentencePiece"):
            sc_c2s.models.load(path, device="cpu")
    (path / "tokenizer.model").write_bytes(spm)

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # not installed: say how, before reading anything
    with pytest.raises(
        ImportError, match=r'tokenizer.model .* needs the `sentencepiece` package: `pip install "sc-c2s\[gemma\]"`'
    ):
        sc_c2s.models.load(path, device="cpu")
    monkeypatch.setattr(_memory, "capacity", lambda device: 2**40)
    with pytest.raises(ImportError, match="needs the `sentencepiece` package"):
        sc_c2s.models.load("C2S-Scale-Gemma-2-2B", device="cpu")
    assert not checkpoint_server.requests  # before downloading 5 GB


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_answer_prefix_is_detected_once_where_the_metadata_has_none(
    short_sentences, in_memory, architecture, scanpy_log
):
    """A checkpoint without `answer_prefix` gets the form of the answer its labels are likelier in."""
    c2s = in_memory(architecture)
    c2s.metadata.answer_prefix = None
    words = _utils.cell_words(short_sentences, c2s, n_genes=N_GENES, mod=None)
    ids = _runtime.tokenize(c2s.tokenizer, _utils.prediction_prompts(words, n_genes=N_GENES, organism="Homo sapiens"))
    pad = _runtime.pad_id(c2s.tokenizer)
    answers, by_hand = {}, {}
    for prefix in (" ", ""):
        texts = [prompts.answer(label, prefix=prefix) for label in LONG_LABELS]
        answers[prefix] = _runtime.tokenize(c2s.tokenizer, texts, special_tokens=False)
        loglik = _candidates.score_answers(c2s.model, ids[:8], answers[prefix], batch_size=4, pad_id=pad, desc="")
        by_hand[prefix] = logsumexp(loglik, axis=1).mean()
    assert answers[" "] != answers[""]  # sub-word tokenizers spell the two forms differently
    expected = "" if by_hand[""] > by_hand[" "] else " "

    loglik = _annotate.score_labels(c2s, ids, LONG_LABELS, batch_size=5)
    assert c2s.metadata.answer_prefix == expected
    assert scanpy_log.getvalue().count("records no answer prefix") == 1
    full = _candidates.score_answers(c2s.model, ids, answers[expected], batch_size=5, pad_id=pad, desc="")
    np.testing.assert_allclose(loglik, full, atol=1e-4)
    _annotate.score_labels(c2s, ids, LONG_LABELS, batch_size=5)
    assert scanpy_log.getvalue().count("records no answer prefix") == 1  # detected once
