from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pandas as pd
from scanpy import logging as logg

from sc_c2s import prompts
from sc_c2s._data import DataHandler, prepare
from sc_c2s._docs import doc_adata, doc_batch_size, doc_device, doc_mod, doc_model, doc_organism, doc_params

from ._inference import (
    Batch,
    batches,
    cell_words,
    check_n_genes,
    check_prompts,
    decode,
    inference,
    pad_id,
    period_ids,
    prediction_prompts,
    resolve_batch_size,
    tokenize,
)

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData
    from transformers import Cache, PreTrainedModel

    from sc_c2s.models import C2SModel

#: New tokens a free answer may take before it is cut.
MAX_ANSWER_TOKENS = 32
#: Most log-probabilities (cells × packed candidate tokens × vocabulary) one pass over the candidates may hold:
#: 2^28 float32 numbers, 1 GiB. More candidates are scored in several passes over the same prompt cache.
LOGIT_BUDGET = 2**28


@doc_params(
    doc_adata=doc_adata,
    doc_model=doc_model,
    doc_organism=doc_organism,
    doc_batch_size=doc_batch_size,
    doc_device=doc_device,
    doc_mod=doc_mod,
)
def annotate(
    adata: AnnData | MuData,
    *,
    model: C2SModel | str,
    labels: Sequence[str] | Literal["model"] | None = None,
    n_genes: int = 200,
    organism: prompts.Organism | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    key_added: str = "c2s_cell_type",
    mod: str | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Predict the cell type of each cell with a C2S model.

    Each cell's top `n_genes` genes from :func:`sc_c2s.pp.to_sentences` fill the cell-type prediction prompt of
    :mod:`sc_c2s.prompts` (upper-cased if the model was trained so). Two modes:

    free (``labels=None``)
        The model writes the answer greedily, up to 32 tokens, stopping at the first period or end of sequence.
        The answer is decoded from the new tokens only; surrounding whitespace and the final period are stripped.
        The score is the model's probability of that answer.
    constrained (``labels=[...]`` or ``labels="model"``)
        The log-likelihood of each candidate answer (``" {{label}}."``, summed over its tokens) is scored after
        the prompt; the prompt is read once per cell and its KV cache serves all candidates in one forward
        pass. The most likely label wins, so the result is always one of `labels`; the score is its softmax
        probability over the label set.

    Cells are batched by token length with left padding; results do not depend on `batch_size` (up to
    floating-point rounding). Nothing is sampled, so results are deterministic on a given device.

    Parameters
    ----------
    {doc_adata}
    {doc_model}
    labels
        Candidate cell types for constrained annotation, ``"model"`` for the label set the checkpoint was
        trained on (``model.metadata.labels``), or ``None`` to let the model write the answer.
    n_genes
        Genes of each cell's sentence in the prompt (the published checkpoints read 200).
    {doc_organism}
    {doc_batch_size}
    {doc_device}
    key_added
        Column of ``obs`` for the cell types; the score goes to ``key_added + "_score"``.
    {doc_mod}
    copy
        Return a copy instead of writing into `adata`.

    Returns
    -------
    ``None``, or a copy of `adata` if ``copy=True``, with

    ``obs[key_added]``
        Categorical cell types (categories: `labels` in constrained mode, the answers otherwise).
    ``obs[key_added + "_score"]``
        Probability of the chosen cell type: over the label set in constrained mode, of the written answer in
        free mode.
    ``uns[key_added]["params"]``
        ``mode`` (``"free"`` or ``"constrained"``), ``labels``, ``n_genes``, ``organism`` and the model's
        provenance: ``model`` name, ``path``, ``revision``, ``sha256`` of its files.

    Raises
    ------
    KeyError
        If :func:`sc_c2s.pp.to_sentences` has not been run on `adata` (it is not run implicitly, so that the
        sentences are always made with parameters the user chose).

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
    DataHandler(adata, mod).c2s()
    check_n_genes(n_genes)
    candidates = None if labels is None else label_set(labels)
    if organism is not None:
        prompts.check_organism(organism)
    c2s = resolve(model, device=device)
    if candidates == "model":
        candidates = label_set(model_labels(c2s))
    organism = prompts.check_organism(c2s.metadata.organism if organism is None else organism)
    ids = tokenize(c2s, prediction_prompts(cell_words(adata, c2s, n_genes=n_genes, mod=mod), organism=organism))
    batch_size = resolve_batch_size(batch_size, c2s.device)

    params = {"mode": "free" if candidates is None else "constrained", "n_genes": n_genes, "organism": organism}
    if candidates is None:
        check_prompts(c2s, ids, room=MAX_ANSWER_TOKENS)
        answers, score = generate_answers(c2s, ids, batch_size=batch_size)
        cell_types = pd.Categorical(answers, categories=sorted(set(answers)))
    else:
        from scipy.special import softmax

        loglik = score_labels(c2s, ids, candidates, batch_size=batch_size)
        prob = softmax(loglik, axis=1)
        best = loglik.argmax(axis=1)
        cell_types = pd.Categorical.from_codes(best, categories=candidates)
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
    labels = list(labels)
    bad = [label for label in labels if not isinstance(label, str) or not label.strip()]
    if not labels or bad:
        msg = f"`labels` must be non-empty strings; got {bad[:5] if bad else 'an empty list'}."
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


def generate_answers(c2s: C2SModel, ids: list[list[int]], *, batch_size: int) -> tuple[list[str], np.ndarray]:
    """Write the greedy answer to each prompt of `ids`; return the answers and the model's probability of each."""
    tokenizer = c2s.tokenizer
    stop_ids, pad = period_ids(tokenizer), pad_id(tokenizer)
    answers: list[str] = [""] * len(ids)
    prob = np.empty(len(ids))
    with inference(c2s.model):
        for batch in batches(ids, batch_size=batch_size, pad_id=pad, device=c2s.device, desc="annotating"):
            tokens, logp = decode(c2s.model, batch, max_new_tokens=MAX_ANSWER_TOKENS, stop_ids=stop_ids, pad_id=pad)
            tokens = tokens.cpu().numpy()
            is_stop = np.isin(tokens, stop_ids)
            ends = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, tokens.shape[1])
            for i, row, end in zip(batch.index, tokens, ends, strict=True):
                answers[i] = parse_answer(tokenizer.decode(row[:end], skip_special_tokens=True))
            prob[batch.index] = logp.sum(1).exp().double().cpu().numpy()
    return answers, prob


def parse_answer(text: str) -> str:
    """Take the cell type out of a generated answer: strip surrounding whitespace and the final period."""
    return text.strip().removesuffix(".").strip()


class Candidates(NamedTuple):
    """Candidate answers laid out to be scored together after a prompt.

    The first token of every answer is scored from the prompt's last logits. The other tokens are packed into
    one sequence, candidate after candidate (each padded to the longest), read over the prompt's KV cache with a
    mask that lets each token see the prompt and the earlier tokens of its own candidate only.
    """

    first: torch.Tensor
    """First token of each candidate."""
    inputs: torch.Tensor
    """Packed tokens fed to the model: all but the last of each candidate."""
    targets: torch.Tensor
    """Packed tokens to score: all but the first of each candidate."""
    valid: torch.Tensor
    """Which packed positions hold a real token."""
    offsets: torch.Tensor
    """Position of each packed token after the end of the prompt."""
    visible: torch.Tensor
    """Packed × packed: which packed tokens each packed token may attend to."""


def pack_candidates(
    answer_ids: Sequence[Sequence[int]], *, pad_id: int, device: torch.device, max_packed: int
) -> list[Candidates]:
    """Lay out tokenised answers for :func:`score_batch`, in groups of at most `max_packed` packed tokens.

    Groups hold consecutive candidates (at least one each), so their scores concatenate in the order of
    `answer_ids`.
    """
    groups: list[list[Sequence[int]]] = [[]]
    for seq in answer_ids:
        width = max([len(seq), *map(len, groups[-1])]) - 1
        if groups[-1] and (len(groups[-1]) + 1) * width > max_packed:
            groups.append([])
        groups[-1].append(seq)
    return [_pack(group, pad_id=pad_id, device=device) for group in groups]


def _pack(answer_ids: Sequence[Sequence[int]], *, pad_id: int, device: torch.device) -> Candidates:
    import torch

    n, width = len(answer_ids), max(map(len, answer_ids)) - 1
    inputs = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), pad_id, dtype=torch.long)
    valid = torch.zeros((n, width), dtype=torch.bool)
    for k, seq in enumerate(answer_ids):
        inputs[k, : len(seq) - 1] = torch.as_tensor(seq[:-1], dtype=torch.long)
        targets[k, : len(seq) - 1] = torch.as_tensor(seq[1:], dtype=torch.long)
        valid[k, : len(seq) - 1] = True
    candidate = torch.arange(n).repeat_interleave(width)
    offsets = torch.arange(width).repeat(n)
    visible = (candidate[:, None] == candidate[None, :]) & (offsets[None, :] <= offsets[:, None])
    first = torch.as_tensor([seq[0] for seq in answer_ids], dtype=torch.long)
    tensors = (first, inputs.flatten(), targets.flatten(), valid.flatten(), offsets, visible)
    return Candidates(*(t.to(device) for t in tensors))


def score_batch(model: PreTrainedModel, batch: Batch, groups: Sequence[Candidates]) -> torch.Tensor:
    """Score the log-likelihood of every candidate answer after every prompt of `batch` (cells × candidates).

    The prompts run once; each group of candidates then runs over their KV cache, which is cut back to the
    prompts afterwards.
    """
    import torch

    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    first = torch.log_softmax(out.logits[:, -1], -1, dtype=torch.float32)
    return torch.cat([first[:, group.first] + _continuations(model, batch, group, cache) for group in groups], 1)


def _continuations(model: PreTrainedModel, batch: Batch, group: Candidates, cache: Cache) -> torch.Tensor | float:
    """Score all but the first token of each candidate of `group` after the cached prompts (cells × candidates)."""
    import torch

    n_packed, n_cells = len(group.inputs), len(batch.index)
    if n_packed == 0:
        return 0.0
    sees_prompt = batch.attention_mask.bool()[:, None, None, :].expand(-1, 1, n_packed, -1)
    sees_packed = group.visible[None, None].expand(n_cells, 1, -1, -1)
    visible = torch.cat([sees_prompt, sees_packed], dim=-1)
    dtype = model.dtype
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
    out = model(
        input_ids=group.inputs[None].expand(n_cells, -1),
        attention_mask=mask,
        position_ids=batch.position_ids[:, -1:] + 1 + group.offsets[None],
        past_key_values=cache,
        use_cache=True,
    )
    cache.crop(-n_packed)
    logp = torch.log_softmax(out.logits, -1, dtype=torch.float32)
    logp = logp.gather(2, group.targets[None, :, None].expand(n_cells, -1, 1))[..., 0] * group.valid
    return logp.reshape(n_cells, len(group.first), -1).sum(-1)


def score_labels(c2s: C2SModel, ids: list[list[int]], labels: Sequence[str], *, batch_size: int) -> np.ndarray:
    """Score the log-likelihood of each label's answer after each prompt (cells × labels)."""
    answer_ids = tokenize(c2s, [prompts.answer(label) for label in labels], special_tokens=False)
    check_labels(c2s, labels, answer_ids)
    check_prompts(c2s, ids, room=max(map(len, answer_ids)))
    pad = pad_id(c2s.tokenizer)
    vocabulary = c2s.model.get_output_embeddings().out_features
    max_packed = max(1, LOGIT_BUDGET // (batch_size * vocabulary))
    groups = pack_candidates(answer_ids, pad_id=pad, device=c2s.device, max_packed=max_packed)
    loglik = np.empty((len(ids), len(labels)))
    with inference(c2s.model):
        for batch in batches(ids, batch_size=batch_size, pad_id=pad, device=c2s.device, desc="annotating"):
            loglik[batch.index] = score_batch(c2s.model, batch, groups).double().cpu().numpy()
    return loglik


def check_labels(c2s: C2SModel, labels: Sequence[str], answer_ids: Sequence[Sequence[int]]) -> None:
    """Refuse labels the tokenizer cannot tell apart; warn about labels with words it does not know."""
    seen: dict[tuple[int, ...], str] = {}
    for label, ids in zip(labels, answer_ids, strict=True):
        if tuple(ids) in seen:
            msg = (
                f"The labels {seen[tuple(ids)]!r} and {label!r} are the same tokens for {c2s.name!r}, so the model "
                "cannot tell them apart; merge or rename them."
            )
            raise ValueError(msg)
        seen[tuple(ids)] = label
    unk = c2s.tokenizer.unk_token_id
    unknown = [label for label, ids in zip(labels, answer_ids, strict=True) if unk is not None and unk in ids]
    if unknown:
        logg.warning(
            f"{len(unknown)} labels have words unknown to {c2s.name!r} (e.g. {unknown[:3]}); their scores are "
            "unreliable. Use the cell-type names the model was trained on (`model.metadata.labels`)."
        )
