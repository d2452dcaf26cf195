"""Scoring a fixed set of candidate answers after each prompt, reading every prompt once.

The first token of every answer is scored from the prompt's last logits. The other tokens of all candidates are
packed into one sequence, candidate after candidate (each padded to the longest), and read over the prompt's KV
cache with a mask that lets each token see the prompt and the earlier tokens of its own candidate only. When
the packed tokens' log-probabilities would not fit :data:`LOGIT_BUDGET`, the candidates are split into groups,
each read over the same cache, which is cut back to the prompts after each group.

Packing needs an attention that takes such a mask (PyTorch's SDPA and the eager attention do; FlashAttention-2
does not) and, in models with sliding-window layers (Gemma 2), prompt and candidates within the window, since
the one mask serves every layer. Otherwise each candidate is read on its own over the cache, with the ordinary
padding mask, from which the model makes its own (sliding-window) masks. The cache keeps every layer whole
(no sliding-window layers), so that it can be cut back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sc_c2s import prompts

from . import _runtime

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

#: Most log-probabilities (cells × packed candidate tokens × vocabulary) one pass over the candidates may hold:
#: 2^28 float32 numbers, 1 GiB. More candidates are scored in several passes over the same prompt cache.
LOGIT_BUDGET = 2**28


class Candidates(NamedTuple):
    """Candidate answers laid out to be scored together after a prompt."""

    first: torch.Tensor
    """First token of each candidate."""
    inputs: torch.Tensor
    """Packed tokens fed to the model: all but the last of each candidate."""
    targets: torch.Tensor
    """Packed tokens to score: all but the first of each candidate."""
    valid: torch.Tensor
    """Which packed positions hold a real token."""
    width: int
    """Packed tokens per candidate."""
    offsets: torch.Tensor
    """Position of each packed token after the end of the prompt."""
    visible: torch.Tensor
    """Packed × packed: which packed tokens each packed token may attend to."""


def label_answers(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str], *, prefix: str = " ") -> list[list[int]]:
    """Token ids of each label's answer (`prefix`, the label, a period; no special tokens), as they are scored."""
    return _runtime.tokenize(
        tokenizer, [prompts.answer(label, prefix=prefix) for label in labels], special_tokens=False
    )


def score_answers(
    model: PreTrainedModel,
    ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    *,
    batch_size: int | None,
    pad_id: int,
    desc: str | None,
) -> np.ndarray:
    """Log-likelihood of each tokenised answer after each tokenised prompt, summed over its tokens (cells × answers).

    `batch_size` ``None`` sizes batches to the free memory of a GPU (see :func:`~sc_c2s.models._runtime.run_batches`);
    `desc` names the progress bar (``None``: no bar).
    """
    device = _runtime.model_device(model)
    vocabulary = model.get_output_embeddings().out_features
    groups: dict[int, list[Candidates]] = {}  # by the most packed tokens the batch size allows
    loglik = np.empty((len(ids), len(answer_ids)))

    def score(batch: _runtime.Batch) -> None:
        max_packed = max(1, LOGIT_BUDGET // (len(batch.index) * vocabulary))
        if max_packed not in groups:
            groups[max_packed] = pack_candidates(answer_ids, pad_id=pad_id, device=device, max_packed=max_packed)
        loglik[batch.index] = score_batch(model, batch, groups[max_packed]).cpu().double().numpy()

    room = len(answer_ids) * (max(map(len, answer_ids)) - 1) + 1  # the packed candidates, in the cache
    with _runtime.inference(model):
        _runtime.run_batches(model, ids, score, batch_size=batch_size, pad_id=pad_id, desc=desc, room=room)
    return loglik


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
    first, inputs, targets, valid, offsets, visible = (
        t.to(device) for t in (first, inputs.flatten(), targets.flatten(), valid.flatten(), offsets, visible)
    )
    return Candidates(first, inputs, targets, valid, width, offsets, visible)


def score_batch(model: PreTrainedModel, batch: _runtime.Batch, groups: Sequence[Candidates]) -> torch.Tensor:
    """Score the log-likelihood of every candidate answer after every prompt of `batch` (cells × candidates).

    The prompts run once; each group of candidates then runs over their KV cache, which is cut back to the
    prompts afterwards.
    """
    import torch

    logits, cache = _runtime.forward(
        model,
        batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        cache=_runtime.new_cache(),
        use_cache=True,
        logits_to_keep=1,
    )
    first = torch.log_softmax(logits[:, -1], -1, dtype=torch.float32)
    packs = _runtime.takes_custom_masks(model)
    window = _runtime.sliding_window(model)
    scores = []
    for group in groups:
        packed = packs and (window is None or batch.input_ids.shape[1] + group.width <= window)
        rest = (_continuations if packed else _one_at_a_time)(model, batch, group, cache)
        scores.append(first[:, group.first] + rest)
    return torch.cat(scores, 1)


def _continuations(
    model: PreTrainedModel, batch: _runtime.Batch, group: Candidates, cache: Cache
) -> torch.Tensor | float:
    """Score all but the first token of each candidate of `group` after the cached prompts (cells × candidates).

    The candidates are read together, packed, under a 4-D mask.
    """
    import torch

    n_packed, n_cells = len(group.inputs), len(batch.index)
    if n_packed == 0:
        return 0.0
    sees_prompt = batch.attention_mask.bool()[:, None, None, :].expand(-1, 1, n_packed, -1)
    sees_packed = group.visible[None, None].expand(n_cells, 1, -1, -1)
    visible = torch.cat([sees_prompt, sees_packed], dim=-1)
    dtype = model.dtype
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
    logits, _ = _runtime.forward(
        model,
        group.inputs[None].expand(n_cells, -1),
        attention_mask=mask,
        position_ids=batch.position_ids[:, -1:] + 1 + group.offsets[None],
        cache=cache,
        use_cache=True,
    )
    cache.crop(-n_packed)
    logp = torch.log_softmax(logits, -1, dtype=torch.float32)
    logp = logp.gather(2, group.targets[None, :, None].expand(n_cells, -1, 1))[..., 0] * group.valid
    return logp.reshape(n_cells, len(group.first), -1).sum(-1)


def _one_at_a_time(
    model: PreTrainedModel, batch: _runtime.Batch, group: Candidates, cache: Cache
) -> torch.Tensor | float:
    """Score all but the first token of each candidate of `group` after the cached prompts, one candidate per pass.

    Each pass takes the padding mask of the prompts, extended by the candidate's tokens.
    """
    import torch

    n_cells = len(batch.index)
    if group.width == 0:
        return 0.0
    inputs, targets = group.inputs.view(-1, group.width), group.targets.view(-1, group.width)
    lengths = group.valid.view(-1, group.width).sum(1).tolist()
    scores = torch.zeros((n_cells, len(lengths)), dtype=torch.float32, device=inputs.device)
    for k, n in enumerate(lengths):
        if n == 0:
            continue
        mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((n_cells, n))], dim=1)
        logits, _ = _runtime.forward(
            model,
            inputs[k, :n][None].expand(n_cells, -1),
            attention_mask=mask,
            position_ids=batch.position_ids[:, -1:] + 1 + torch.arange(n, device=inputs.device)[None],
            cache=cache,
            use_cache=True,
        )
        cache.crop(-n)
        logp = torch.log_softmax(logits, -1, dtype=torch.float32)
        scores[:, k] = logp.gather(2, targets[k, :n][None, :, None].expand(n_cells, -1, 1))[..., 0].sum(1)
    return scores
