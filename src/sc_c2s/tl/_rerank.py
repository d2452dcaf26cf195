"""Re-ranking constrained annotation with the cell-type generation task of the same model.

A model trained on both single-cell tasks reads a cell two ways: the prediction prompt scores each label given the
cell's sentence, and each label's generation prompt scores the cell's sentence given the label, gene by gene (a
generative classifier). Summed, the two raised the macro-F1 of all six models trained with the defaults on
validation splits (method page, "Annotating by the generation task"). Reading a sentence under a label costs a
forward pass over the whole sentence, so only the prediction's most likely labels are read again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sc_c2s.models import _runtime, _trainer

from . import _samples
from ._utils import check_task

if TYPE_CHECKING:
    from sc_c2s.models import C2SModel

#: Labels re-ranked by default: the prediction's most likely three, for a model trained on both single-cell tasks.
DEFAULT_RERANK = 3
#: The tasks a model must have been trained on for the default to re-rank.
TASKS = ("cell_type_prediction", "cell_type_generation")


def check_rerank(rerank: object, *, constrained: bool) -> int | None:
    """Check `rerank` before the model loads: ``None`` or an integer of at least 0, with candidate labels if not 0."""
    if rerank is None:
        return None
    if not isinstance(rerank, int | np.integer) or isinstance(rerank, bool) or rerank < 0:
        msg = f"`rerank` must be a number of labels (0 to switch re-ranking off) or None, got {rerank!r}."
        raise ValueError(msg)
    if rerank and not constrained:
        msg = (
            f"`rerank={rerank}` re-ranks candidate labels, but `labels=None` lets the model write its answer; pass "
            '`labels=[...]` or `labels="model"`, or leave `rerank` out.'
        )
        raise ValueError(msg)
    return int(rerank)


def n_reranked(c2s: C2SModel, rerank: int | None, *, n_labels: int) -> int:
    """Return how many labels to re-rank per cell: at most `n_labels`, and 0 where fewer than two would be read.

    ``None`` takes :data:`DEFAULT_RERANK` for a model :func:`sc_c2s.tl.finetune` trained on both :data:`TASKS`
    (its metadata records the training), 0 for others.
    """
    if rerank is None:
        trained_here = bool(c2s.metadata.training)
        rerank = DEFAULT_RERANK if trained_here and set(TASKS) <= set(c2s.metadata.tasks) else 0
    elif rerank:
        check_task(c2s, "cell_type_generation")
    rerank = min(rerank, n_labels)
    return rerank if rerank > 1 else 0


def rerank_labels(
    c2s: C2SModel,
    words: Sequence[Sequence[str]],
    loglik: np.ndarray,
    labels: Sequence[str],
    *,
    k: int,
    organism: str,
    batch_size: int | None,
) -> np.ndarray:
    """Log-probabilities of `labels` (cells × labels) after re-ranking each cell's `k` most likely ones.

    `loglik` holds the prediction's log-likelihood of each label's answer. For each cell, the log-likelihood of its
    sentence (`words`, the answer with its EOS) after the generation prompt of each of its `k` labels is turned
    into a distribution over those labels (softmax) and its log is added to the prediction's log-probabilities.
    The `k` labels keep the probability the prediction gives them together, shared in proportion to the
    exponentials of those sums; the other labels keep theirs.
    """
    from scipy.special import log_softmax, logsumexp

    logp = log_softmax(loglik, axis=1)
    top = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    generation = sentence_loglik(
        c2s, words, np.asarray(labels, dtype=object)[top], organism=organism, batch_size=batch_size
    )
    top_logp = np.take_along_axis(logp, top, axis=1)
    combined = top_logp + log_softmax(generation, axis=1)
    mass = logsumexp(top_logp, axis=1, keepdims=True)
    out = logp.copy()
    np.put_along_axis(out, top, mass + log_softmax(combined, axis=1), axis=1)
    return out


def sentence_loglik(
    c2s: C2SModel,
    words: Sequence[Sequence[str]],
    labels: np.ndarray,
    *,
    organism: str,
    batch_size: int | None,
) -> np.ndarray:
    """Log-likelihood of each cell's sentence after the generation prompt of each of its `labels` (cells × labels).

    Samples are those :func:`sc_c2s.tl.finetune` trains generation on: the prompt asks for as many genes as the
    sentence has, the answer is the sentence and EOS.
    """
    n_cells, k = labels.shape
    samples = _samples.encode(
        c2s.tokenizer,
        [cell for cell in words for _ in range(k)],
        labels.ravel().tolist(),
        tasks=["cell_type_generation"],
        organism=organism,
        upper=c2s.metadata.upper_case,
        max_length=np.iinfo(np.int64).max,  # nothing cut: a sample longer than the model reads is refused below
    )
    _runtime.check_context(c2s.model, samples.input_ids, name=c2s.name)
    losses = _trainer.answer_losses(
        c2s.model, samples, batch_size=batch_size, pad_id=_runtime.pad_id(c2s.tokenizer), desc="re-ranking"
    )
    n_answer = np.array([len(ids) for ids in samples.input_ids]) - samples.n_prompt
    return -(losses * n_answer).reshape(n_cells, k)
