from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg

from sc_c2s import _dask, _keys, prompts
from sc_c2s._data import DataHandler, check_writable, prepare
from sc_c2s._docs import (
    doc_adata,
    doc_batch_size,
    doc_client,
    doc_device,
    doc_mod,
    doc_model,
    doc_organism,
    doc_params,
)
from sc_c2s._utils._validate import check_key, check_positive_int
from sc_c2s.models import _candidates, _runtime
from sc_c2s.models._scratch import join_punctuation

from ._rerank import check_rerank, n_reranked, rerank_labels
from ._samples import ANSWER_TEXT
from ._utils import (
    PREFIX_PROMPTS,
    cell_words,
    check_task,
    free_labels,
    in_stable_order,
    keep_answer_prefix,
    model_n_genes,
    model_organism,
    prediction_prompts,
    warn_empty_sentences,
)

if TYPE_CHECKING:
    import os

    import torch
    from anndata import AnnData
    from distributed import Client
    from mudata import MuData
    from transformers import PreTrainedTokenizerBase

    from sc_c2s.models import C2SModel

#: New tokens a free answer may take before it is cut.
MAX_ANSWER_TOKENS = 32


@doc_params(
    doc_adata=doc_adata,
    doc_model=doc_model,
    doc_organism=doc_organism,
    doc_batch_size=doc_batch_size,
    doc_device=doc_device,
    doc_mod=doc_mod,
    doc_client=doc_client,
)
def annotate(
    adata: AnnData | MuData,
    *,
    model: C2SModel | str | os.PathLike[str],
    labels: Sequence[str] | Literal["model"] | None = None,
    rerank: int | None = None,
    n_genes: int | None = None,
    organism: prompts.Organism | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    key_added: str = _keys.CELL_TYPE,
    mod: str | None = None,
    client: Client | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Predict the cell type of each cell with a C2S model.

    Each cell's top `n_genes` genes from :func:`sc_c2s.pp.to_sentences` fill the cell-type prediction prompt of
    :mod:`sc_c2s.prompts` (upper-cased if the model was trained so). Two modes:

    free (``labels=None``)
        The model writes the answer greedily, up to 32 tokens, stopping at the first period or end of sequence;
        past a period inside one of the model's own labels (``model.metadata.labels``, e.g. ``"Ex. neuron"``): the
        answer is then the longest of them it wrote, else what it wrote up to the period where it left the start of
        all of them. The answer is decoded from the new tokens only; surrounding whitespace and the final period
        are stripped. The score is the model's probability of that answer. An answer of two words or more, most of
        them genes of `adata` or of the model's vocabulary, is a continued cell sentence rather than a cell type (a
        failure of some published checkpoints, and of models asked about data unlike their training data): unless
        it is one of the model's labels, it is missing (NaN), and such answers are counted in a warning.
    constrained (``labels=[...]`` or ``labels="model"``)
        The log-likelihood of each candidate answer (``" {{label}}."``, summed over its tokens) is scored after
        the prompt; the prompt is read once per cell and its KV cache serves all candidates in one forward
        pass. With `rerank`, the most likely labels are then scored again by the cell-type generation task: the
        log-likelihood of the cell's sentence after each one's generation prompt, as a distribution over these
        labels, is added to the prediction's log-probabilities, and they share the probability the prediction gave
        them in proportion to the exponentials of these sums. The most likely label wins, so the result is always
        one of `labels`; the score is its probability over the label set, calibrated for a model
        :func:`~sc_c2s.tl.finetune` trained: the log-probabilities are divided by the temperature it fit on its
        held-out cells for this number of labels re-ranked (``model.metadata.score_temperatures``; 1 otherwise),
        which changes no cell's label.

    Cells are batched by token length with left padding; results do not depend on `batch_size` (up to
    floating-point rounding). Nothing is sampled, so results are deterministic on a given device.

    Parameters
    ----------
    {doc_adata}
    {doc_model}
    labels
        Candidate cell types for constrained annotation, ``"model"`` for the label set the checkpoint was
        trained on (``model.metadata.labels``), or ``None`` to let the model write the answer.
    rerank
        In constrained mode, how many of each cell's most likely labels the generation task re-ranks (``0``: none).
        ``None``: 3 for a model :func:`~sc_c2s.tl.finetune` trained on both cell-type prediction and generation
        (the default tasks), which raised macro-F1 on validation splits at the cost of three readings of each
        cell's sentence; 0 for other models, published checkpoints included (not measured).
    n_genes
        Genes of each cell's sentence in the prompt; ``None``: as many as the model was trained on
        (``model.metadata.n_genes``; 200 for the published checkpoints).
    {doc_organism}
    {doc_batch_size}
    {doc_device}
    key_added
        Column of ``obs`` for the cell types; the score goes to ``key_added + "_score"``.
    {doc_mod}
    {doc_client}
    copy
        Return a copy instead of writing into `adata`.

    Returns
    -------
    ``None``, or a copy of `adata` if ``copy=True``, with

    ``obs[key_added]``
        Categorical cell types, whose categories are the labels given to at least one cell, sorted, as scanpy's
        ``groupby`` plots and tests need (the whole label set is in ``params``); free answers that are empty or
        list genes are missing.
    ``obs[key_added + "_score"]``
        Probability of the chosen cell type: over the label set in constrained mode (calibrated where the model
        says how), of the written answer in free mode.
    ``uns[key_added]["params"]``
        ``mode`` (``"free"`` or ``"constrained"``), ``labels`` and ``score_temperature`` (constrained mode),
        ``rerank`` (the labels re-ranked per cell; 0 in free mode), ``n_genes``, ``organism`` and the model's
        provenance: ``model`` name, ``path``, ``revision``, ``sha256`` of its files.

    Raises
    ------
    KeyError
        If :func:`sc_c2s.pp.to_sentences` has not been run on `adata` (it is not run implicitly, so that the
        sentences are always made with parameters the user chose).

    Warns
    -----
    UserWarning
        If some cells have empty sentences (they express no gene: their cell type is a guess from the prompt
        alone), `labels` holds a single label (every cell gets it, with score 1), or free answers are lists of genes
        or empty.

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)
    >>> sc_c2s.tl.annotate(adata, model="demo", labels="model")  # doctest: +SKIP
    >>> adata.obs[["c2s_cell_type", "c2s_cell_type_score"]].head()  # doctest: +SKIP
    """
    from sc_c2s.models import resolve

    start = logg.info("annotating cell types with a C2S model")
    genes = DataHandler(adata, mod).c2s()["genes"]
    check_positive_int(n_genes, "n_genes", none_ok=True)
    check_key(key_added, "key_added")
    check_positive_int(batch_size, "batch_size", none_ok=True)  # before the model loads (or downloads)
    check_writable(adata, copy=copy)
    candidates = None if labels is None else label_set(labels)
    rerank = check_rerank(rerank, constrained=candidates is not None)
    if organism is not None:
        prompts.check_organism(organism)
    if _dask.wanted(adata, mod, client):
        kwargs = {
            "labels": candidates,  # checked, and a list: an iterator given would reach the tasks spent
            "rerank": rerank,
            "n_genes": n_genes,
            "organism": organism,
            "batch_size": batch_size,
        }
        return _dask.map_verb(
            annotate,
            adata,
            model=model,
            device=device,
            mod=mod,
            client=client,
            copy=copy,
            start=start,
            key_added=key_added,
            **kwargs,
        )
    c2s = resolve(model, device=device)
    check_task(c2s, "cell_type_prediction")
    if candidates == "model":
        candidates = model_labels(c2s)  # checked when trained, by the rules of then
    if candidates is not None and len(candidates) == 1:
        warnings.warn(
            f"`labels` holds a single label, so every cell is labelled {candidates[0]!r} with score 1; pass the "
            "candidate cell types, or `labels=None` to let the model write them.",
            UserWarning,
            stacklevel=2,
        )
    organism = model_organism(c2s, organism)
    n_genes = model_n_genes(c2s, n_genes)
    words = cell_words(adata, c2s, n_genes=n_genes, mod=mod)
    warn_empty_sentences(sum(not cell for cell in words), cells="cells", results="their cell types")
    batch_size = _runtime.resolve_batch_size(batch_size, c2s.device)

    params = {
        "mode": "free" if candidates is None else "constrained",
        "rerank": 0,
        "n_genes": n_genes,
        "organism": organism,
    }
    if candidates is None:
        ids = _runtime.tokenize(c2s.tokenizer, prediction_prompts(words, n_genes=n_genes, organism=organism))
        _runtime.check_context(c2s.model, ids, name=c2s.name, room=MAX_ANSWER_TOKENS)
        answers, score = generate_answers(c2s, ids, known=c2s.metadata.labels, batch_size=batch_size)
        named = free_labels(
            answers, genes, vocabulary=c2s.metadata.vocabulary, known=c2s.metadata.labels, what="cell types"
        )
        cell_types = pd.Categorical(named, categories=sorted({name for name in named if name is not None}))
        score = np.where(cell_types.isna(), np.nan, score)
    else:
        from scipy.special import softmax

        readings = label_loglik(
            c2s, words, candidates, n_genes=n_genes, organism=organism, rerank=rerank, batch_size=batch_size
        )
        params["rerank"] = max(readings)
        loglik = readings[params["rerank"]]
        params["score_temperature"] = c2s.metadata.score_temperatures.get(str(params["rerank"]), 1.0)
        prob = softmax(loglik / params["score_temperature"], axis=1)
        best = loglik.argmax(axis=1)
        chosen = np.asarray(candidates, dtype=object)[best]
        cell_types = pd.Categorical(chosen, categories=sorted(set(chosen)))  # scanpy's `groupby` needs each one
        score = prob[np.arange(len(best)), best]
        params["labels"] = candidates

    results = {
        ("obs", key_added): cell_types,
        ("obs", f"{key_added}_score"): score,
        ("uns", key_added): {"params": {**params, **c2s.provenance()}},
    }
    adata = prepare(adata, copy=copy)
    DataHandler(adata, mod).save_all(results, start=start)
    return adata if copy else None


def label_set(labels: Sequence[str] | str) -> list[str] | Literal["model"]:
    """Check the candidate labels (``"model"`` stands for the checkpoint's, read once it is loaded)."""
    if isinstance(labels, str):
        if labels != "model":
            msg = f'`labels` must be a list of cell types, "model" or None, got the string {labels!r}.'
            raise ValueError(msg)
        return labels
    labels = in_stable_order(labels)
    bad = [label for label in labels if not isinstance(label, str) or not re.fullmatch(ANSWER_TEXT, label)]
    if not labels or bad:
        msg = (
            "`labels` must be non-empty strings of one line, without a space at either end; got "
            f"{bad[:5] if bad else 'an empty list'}."
        )
        raise ValueError(msg)
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        msg = f"`labels` names these more than once: {duplicated}; pass each cell type once."
        raise ValueError(msg)
    return [str(label) for label in labels]


def model_labels(c2s: C2SModel) -> list[str]:
    """Return the label set the checkpoint was trained on, or a clear error if its metadata has none."""
    if not c2s.metadata.labels:
        msg = (
            f'`labels="model"`, but {c2s.name!r} carries no label set in its metadata; pass `labels=[...]` with '
            "the candidate cell types, or `labels=None` to let the model write them."
        )
        raise ValueError(msg)
    return list(c2s.metadata.labels)


def generate_answers(
    c2s: C2SModel,
    ids: list[list[int]],
    *,
    known: Sequence[str] | None,
    batch_size: int | None,
    desc: str = "annotating",
) -> tuple[list[str], np.ndarray]:
    """Write the greedy answer to each prompt of `ids`; return the answers and the model's probability of each.

    An answer ends at its first period, unless one of the answers the model was trained on (`known`: its labels
    or tissues) goes on past it (:func:`answer_length`). `desc` names the progress bar.
    """
    tokenizer = c2s.tokenizer
    periods, pad = np.asarray(_runtime.period_ids(tokenizer)), _runtime.pad_id(tokenizer)
    trained = {join_punctuation(prompts.answer(label, prefix="")) for label in known or ()}  # as answers decode
    # past a period inside an answer ("Ex. neuron"), the model writes on to its end of sequence, which ends every
    # answer finetune trains
    stop_ids = [_runtime.eos_id(tokenizer)] if any("." in answer[:-1] for answer in trained) else periods
    answers: list[str] = [""] * len(ids)
    prob = np.empty(len(ids))

    def answer(batch: _runtime.Batch) -> None:
        tokens, logp = _runtime.decode(
            c2s.model, batch, max_new_tokens=MAX_ANSWER_TOKENS, stop_ids=stop_ids, pad_id=pad
        )
        tokens, logp = tokens.cpu().numpy(), logp.cpu().numpy()  # summed on the CPU: MPS has no float64
        for i, row, row_logp in zip(batch.index, tokens, logp, strict=True):
            end = answer_length(tokenizer, row, periods=periods, known=trained)
            answers[i] = parse_answer(tokenizer.decode(row[:end], skip_special_tokens=True))
            prob[i] = np.exp(row_logp[:end].sum(dtype=np.float64))

    with _runtime.inference(c2s.model):
        _runtime.run_batches(
            c2s.model, ids, answer, batch_size=batch_size, pad_id=pad, desc=desc, room=MAX_ANSWER_TOKENS
        )
    return answers, prob


def answer_length(
    tokenizer: PreTrainedTokenizerBase, tokens: np.ndarray, *, periods: Sequence[int], known: set[str]
) -> int:
    """Count the tokens of the answer that `tokens` begin with.

    Without `known` answers (each with its final period), the first of `periods` (tokens ending with a period, and
    the end of sequence) ends it. With them, the text goes on past a period while it is the start of a longer known
    answer (``"Ex."`` of ``"Ex. neuron."``), and the answer is the longest known one it passed (``"B.1."`` rather
    than ``"B."``), else the text up to where it left them all or ended.
    """
    closed = 0  # tokens of the longest known answer passed
    for j in np.flatnonzero(np.isin(tokens, periods)):
        end = int(j) + 1
        if tokens[j] == tokenizer.eos_token_id or not known:
            return closed or end
        head = join_punctuation(tokenizer.decode(tokens[:end], skip_special_tokens=True).strip())
        if head in known:
            closed = end
        if not any(answer.startswith(head) and answer != head for answer in known):
            return closed or end
    return closed or len(tokens)


def parse_answer(text: str) -> str:
    """Take the cell type out of a generated answer: strip surrounding whitespace and the final period.

    Punctuation joins the word before it again, as it was trained (``"T cells , CD4+"`` → ``"T cells, CD4+"``).
    """
    return join_punctuation(text.strip()).removesuffix(".").strip()


def label_loglik(
    c2s: C2SModel,
    words: Sequence[Sequence[str]],
    labels: Sequence[str],
    *,
    n_genes: int,
    organism: str,
    rerank: int | None,
    batch_size: int | None,
) -> dict[int, np.ndarray]:
    """Log-likelihood of each of `labels` for each cell (cells × labels), as constrained annotation reads them.

    Keyed by the number of labels re-ranked: ``0`` for the prediction prompt alone, and with re-ranking (`rerank`,
    as :func:`n_reranked` resolves it) also that number, for the re-ranked log-probabilities.
    """
    ids = _runtime.tokenize(c2s.tokenizer, prediction_prompts(words, n_genes=n_genes, organism=organism))
    readings = {0: score_labels(c2s, ids, labels, batch_size=batch_size)}
    k = n_reranked(c2s, rerank, n_labels=len(labels))
    if k:
        readings[k] = rerank_labels(c2s, words, readings[0], labels, k=k, organism=organism, batch_size=batch_size)
    return readings


def score_labels(
    c2s: C2SModel,
    ids: list[list[int]],
    labels: Sequence[str],
    *,
    batch_size: int | None,
    desc: str = "annotating",
    cells: str | None = None,
) -> np.ndarray:
    """Score the log-likelihood of each label's answer after each prompt (prompts × labels).

    Answers follow the prompt with the checkpoint's answer prefix (see :func:`answer_prefix`). `cells`: the
    argument that sets the cells of a prompt's group, for the message of
    :func:`~sc_c2s.models._runtime.check_context`.
    """
    prefix = answer_prefix(c2s, ids, labels, batch_size=batch_size)
    answer_ids = _candidates.label_answers(c2s.tokenizer, labels, prefix=prefix)
    check_labels(c2s, labels, answer_ids)
    _runtime.check_context(c2s.model, ids, name=c2s.name, room=max(map(len, answer_ids)), cells=cells)
    pad = _runtime.pad_id(c2s.tokenizer)
    return _candidates.score_answers(c2s.model, ids, answer_ids, batch_size=batch_size, pad_id=pad, desc=desc)


def check_labels(c2s: C2SModel, labels: Sequence[str], answer_ids: Sequence[Sequence[int]]) -> None:
    """Refuse labels the tokenizer cannot tell apart; warn about labels with words it does not know."""
    unk = c2s.tokenizer.unk_token_id
    unknown = {label for label, ids in zip(labels, answer_ids, strict=True) if unk is not None and unk in ids}
    known = "the labels the model was trained on (`model.metadata.labels`, or `model.metadata.tissues` for tissues)"
    seen: dict[tuple[int, ...], str] = {}
    for label, ids in zip(labels, answer_ids, strict=True):
        if tuple(ids) in seen:
            first = seen[tuple(ids)]
            why = (
                f"have words unknown to {c2s.name!r}, which read the same to it, so the model cannot tell them "
                f"apart; use {known}."
                if label in unknown
                else f"are the same tokens for {c2s.name!r}, so the model cannot tell them apart; merge or rename them."
            )
            msg = f"The labels {first!r} and {label!r} {why}"
            raise ValueError(msg)
        seen[tuple(ids)] = label
    ordered = sorted(seen)  # a label's tokens come just before those that begin with them
    for short, long in zip(ordered, ordered[1:], strict=False):
        if long[: len(short)] == short:
            msg = (
                f"The answer to {seen[short]!r} begins the answer to {seen[long]!r} for {c2s.name!r}: scored by the "
                f"likelihood of its tokens, {seen[long]!r} can never score above {seen[short]!r}; rename one of them."
            )
            raise ValueError(msg)
    if unknown:
        examples = [label for label in labels if label in unknown][:3]
        logg.warning(
            f"{len(unknown)} labels have words unknown to {c2s.name!r} (e.g. {examples}); their scores are "
            f"unreliable. Use {known}."
        )


def answer_prefix(c2s: C2SModel, ids: list[list[int]], labels: Sequence[str], *, batch_size: int | None) -> str:
    """Return the checkpoint's answer prefix; detect it once where its metadata records none.

    The labels are scored after the first :data:`~sc_c2s.tl._utils.PREFIX_PROMPTS` prompts with a space before the
    answer and without; the form with the larger mean log-likelihood of the label set (log-sum-exp over the labels)
    wins, the space on a tie (word-level tokenizers read both alike). The choice is kept in ``c2s.metadata`` and
    logged.
    """
    if c2s.metadata.answer_prefix is not None:
        return c2s.metadata.answer_prefix
    from scipy.special import logsumexp

    prompts_ids, pad = ids[:PREFIX_PROMPTS], _runtime.pad_id(c2s.tokenizer)
    scores = {}
    for prefix in (" ", ""):
        answer_ids = _candidates.label_answers(c2s.tokenizer, labels, prefix=prefix)
        loglik = _candidates.score_answers(
            c2s.model, prompts_ids, answer_ids, batch_size=batch_size, pad_id=pad, desc="answer prefix"
        )
        scores[prefix] = float(logsumexp(loglik, axis=1).mean())
    return keep_answer_prefix(c2s, scores, what="answers", measure="mean label-set log-likelihood")
