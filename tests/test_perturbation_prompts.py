from __future__ import annotations

import pytest

from sc_c2s import prompts
from sc_c2s.models._scratch import build_tokenizer
from sc_c2s.tl import _samples


def test_perturbation_prompt_exact():
    expected = (
        "Given the following cell sentence of 3 expressed genes representing a cell's basal state, predict the cell "
        "sentence after applying the perturbation: IFN-beta.\n"
        "Control cell sentence: CD74 ISG15 HLA-DRA.\n"
        "\n"
        "Perturbed cell sentence:"
    )
    assert prompts.perturbation(["CD74", "isg15", "HLA-DRA"], perturbation_name="IFN-beta") == expected
    assert prompts.perturbation(["a"], perturbation_name="x", upper=False).split("\n")[1] == "Control cell sentence: a."


def test_perturbation_prompt_asks_about_n_genes():
    """{num_genes} was the control sentence's length; DESIGN: the number of genes asked for, as in every template."""
    prompt = prompts.perturbation(["CD74", "ISG15"], perturbation_name="IFN-beta", n_genes=200)
    assert prompt.startswith("Given the following cell sentence of 200 expressed genes representing")
    tokenizer = build_tokenizer(["CD74", "ISG15", "IFI6"], ["stimulated", *prompts.PERTURBATION_WORDS], max_genes=5)
    samples = _samples.encode_perturbation(
        tokenizer, [["CD74", "ISG15"]], [["IFI6"]], ["stimulated"], n_genes=5, upper=True, max_length=64
    )
    prompt_ids = samples.input_ids[0][: samples.n_prompt[0]]
    assert tokenizer.decode(prompt_ids).startswith("Given the following cell sentence of 5 expressed genes")


def test_perturbation_samples_longer_than_the_context_are_refused():
    """They lost genes from both sentences until they fitted, so the model trained on cut sentences and
    predict_perturbation refused it at its own `n_genes`."""
    tokenizer = build_tokenizer(["CD74", "ISG15", "IFI6"], ["stimulated", *prompts.PERTURBATION_WORDS], max_genes=5)
    args = (tokenizer, [["CD74", "ISG15"]], [["IFI6", "CD74"]], ["stimulated"])
    (ids,) = _samples.encode_perturbation(*args, n_genes=2, upper=True, max_length=64).input_ids
    assert len(_samples.encode_perturbation(*args, n_genes=2, upper=True, max_length=len(ids)).input_ids[0]) == len(ids)
    match = rf"^1 perturbation sample is longer than the {len(ids) - 1} tokens .* has {len(ids)}\); lower `n_genes`"
    with pytest.raises(ValueError, match=match):
        _samples.encode_perturbation(*args, n_genes=2, upper=True, max_length=len(ids) - 1)


def test_perturbation_sample_text():
    prompt = prompts.perturbation(["CD74"], perturbation_name="stimulated")
    sample = prompt + prompts.answer(prompts.cell_sentence(["ISG15", "IFI6"]))
    assert sample.endswith("\n\nPerturbed cell sentence: ISG15 IFI6.")


def test_scratch_tokenizer_spells_perturbation_prompt():
    """With the perturbation words, every word of the prompt is one known token of a scratch tokenizer."""
    tokenizer = build_tokenizer(["CD74", "ISG15"], ["IFN-beta stimulated", *prompts.PERTURBATION_WORDS], max_genes=5)
    text = prompts.perturbation(["CD74", "ISG15"], perturbation_name="IFN-beta stimulated") + prompts.answer("ISG15")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids[-6:]) == ["Perturbed", "cell", "sentence", ":", "ISG15", "."]
    for word in ("Given", "cell's", "basal", "state", ",", "Control"):
        assert word in tokenizer.get_vocab()


def test_perturbation_words_are_new_template_words():
    # "expressed" is a word of the summary paraphrases already, so TEMPLATE_WORDS has it
    assert prompts.PERTURBATION_WORDS == (
        "Given", "representing", "cell's", "basal", "state", "predict", "after", "applying",
        "perturbation", "Control", "Perturbed",
    )  # fmt: skip
    assert not set(prompts.PERTURBATION_WORDS) & set(prompts.TEMPLATE_WORDS)
