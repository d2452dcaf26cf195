"""Training samples of :func:`sc_c2s.tl.finetune`: the prompt and answer of each task, tokenised.

A sample is ``prompt + answer + EOS`` in the format of :mod:`sc_c2s.prompts`. Samples longer than the model's
context lose genes from the end of their cell sentence (its least expressed genes), with ``{num_genes}`` in the
prompt following suit, so the answer is never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sc_c2s import prompts
from sc_c2s.models import _runtime
from sc_c2s.models._trainer import Samples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def texts(task: str, words: Sequence[str], label: str, *, organism: str, upper: bool) -> tuple[str, str]:
    """Prompt and answer of one training sample of `task` for a cell with ranked genes `words`."""
    if task == "cell_type_prediction":
        return prompts.cell_type_prediction(words, organism=organism, upper=upper), prompts.answer(label)
    if task == "cell_type_generation":
        prompt = prompts.cell_type_generation(label, n_genes=len(words), organism=organism)
        return prompt, prompts.answer(prompts.cell_sentence(words, upper=upper))
    msg = f"Unknown task {task!r}."
    raise ValueError(msg)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    words: Sequence[Sequence[str]],
    labels: Sequence[str],
    *,
    tasks: Sequence[str],
    organism: str,
    upper: bool,
    max_length: int,
    gene_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Samples:
    """Tokenise one sample per cell and task, cells first: ``[cell 0 task 0, cell 0 task 1, cell 1 task 0, …]``.

    The prompt is tokenised with the tokenizer's special tokens (a BOS where the model uses one), the answer
    without, and EOS follows the answer. With `gene_dropout`, each gene of a cell-type prediction sample's
    sentence is left out with that probability (drawn from `rng`; at least one gene stays), the order of the
    others kept; generation samples keep their whole sentence.
    """
    eos = _runtime.eos_id(tokenizer)
    jobs = [
        (task, _drop(cell_words, gene_dropout, rng) if task == "cell_type_prediction" else cell_words, label)
        for cell_words, label in zip(words, labels, strict=True)
        for task in tasks
    ]
    pairs = [texts(task, w, label, organism=organism, upper=upper) for task, w, label in jobs]
    ids = _tokenize(tokenizer, pairs, eos)
    n_truncated = 0
    for i, (prompt_ids, answer_ids) in enumerate(ids):
        if len(prompt_ids) + len(answer_ids) > max_length:
            ids[i] = _truncate(tokenizer, *jobs[i], organism=organism, upper=upper, max_length=max_length, eos=eos)
            n_truncated += 1
    return Samples(
        input_ids=[np.asarray(p + a, dtype=np.int64) for p, a in ids],
        n_prompt=np.array([len(p) for p, _ in ids], dtype=np.int64),
        n_truncated=n_truncated,
    )


def _drop(words: Sequence[str], rate: float, rng: np.random.Generator | None) -> Sequence[str]:
    """`words` without a random share `rate` of them, in order; at least one stays."""
    if not rate or len(words) < 2:
        return words
    keep = rng.random(len(words)) >= rate
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep, strict=True) if k]


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], eos: int
) -> list[tuple[list[int], list[int]]]:
    """Prompt ids and answer ids (EOS appended) of each ``(prompt, answer)`` pair."""
    prompt_ids = _runtime.tokenize(tokenizer, [p for p, _ in pairs])
    answer_ids = _runtime.tokenize(tokenizer, [a for _, a in pairs], special_tokens=False)
    return [(p, [*a, eos]) for p, a in zip(prompt_ids, answer_ids, strict=True)]


def _truncate(
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    words: Sequence[str],
    label: str,
    *,
    organism: str,
    upper: bool,
    max_length: int,
    eos: int,
) -> tuple[list[int], list[int]]:
    """Tokenise the sample with the most leading genes of `words` that fits into `max_length` tokens."""
    spaced = [" " + prompts.cell_sentence([w], upper=upper) for w in words]
    per_word = [len(ids) for ids in _runtime.tokenize(tokenizer, spaced, special_tokens=False)]
    n_words = len(words)
    while True:
        (prompt_ids, answer_ids), *_ = _tokenize(
            tokenizer, [texts(task, words[:n_words], label, organism=organism, upper=upper)], eos
        )
        excess = len(prompt_ids) + len(answer_ids) - max_length
        if excess <= 0:
            return prompt_ids, answer_ids
        if n_words == 0:
            msg = (
                f"A {task} sample for label {label!r} needs {max_length + excess} tokens without any gene, more than "
                f"the model's context of {max_length}."
            )
            raise ValueError(msg)
        # drop the fewest trailing words that cover the excess, then check again
        dropped = np.searchsorted(np.cumsum(per_word[:n_words][::-1]), excess) + 1
        n_words = max(n_words - int(dropped), 0)


def encode_perturbation(
    tokenizer: PreTrainedTokenizerBase,
    control_words: Sequence[Sequence[str]],
    perturbed_words: Sequence[Sequence[str]],
    perturbations: Sequence[str],
    *,
    upper: bool,
    max_length: int,
) -> Samples:
    """Tokenise one perturbation sample per pair: a control cell's sentence prompts, a perturbed cell's answers.

    A sample longer than `max_length` loses genes from the end of both sentences, the same number from each.
    """
    eos = _runtime.eos_id(tokenizer)
    jobs = list(zip(control_words, perturbed_words, perturbations, strict=True))
    ids = _tokenize(tokenizer, [_perturbation_texts(*job, upper=upper) for job in jobs], eos)
    n_truncated = 0
    for i, (prompt_ids, answer_ids) in enumerate(ids):
        control, perturbed, name = jobs[i]
        n_words = max(len(control), len(perturbed))
        while len(prompt_ids) + len(answer_ids) > max_length:
            if n_words == 0:
                msg = f"A perturbation sample for {name!r} does not fit into the model's context of {max_length}."
                raise ValueError(msg)
            n_words = max(n_words - max(1, (len(prompt_ids) + len(answer_ids) - max_length) // 2), 0)
            texts_ = _perturbation_texts(control[:n_words], perturbed[:n_words], name, upper=upper)
            (prompt_ids, answer_ids), *_ = _tokenize(tokenizer, [texts_], eos)
        if n_words < max(len(control), len(perturbed)):
            ids[i] = prompt_ids, answer_ids
            n_truncated += 1
    return Samples(
        input_ids=[np.asarray(p + a, dtype=np.int64) for p, a in ids],
        n_prompt=np.array([len(p) for p, _ in ids], dtype=np.int64),
        n_truncated=n_truncated,
    )


def concat(parts: Sequence[Samples]) -> Samples:
    """Join the samples of all `parts`, in order."""
    return Samples(
        input_ids=[ids for part in parts for ids in part.input_ids],
        n_prompt=np.concatenate([part.n_prompt for part in parts]),
        n_truncated=sum(part.n_truncated for part in parts),
    )


def _perturbation_texts(control: Sequence[str], perturbed: Sequence[str], name: str, *, upper: bool) -> tuple[str, str]:
    prompt = prompts.perturbation(control, perturbation_name=name, upper=upper)
    return prompt, prompts.answer(prompts.cell_sentence(perturbed, upper=upper))
