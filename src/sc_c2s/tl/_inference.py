"""Batched inference shared by the tools that run a C2S model: prompts, batches, left padding, decoding.

Prompts are tokenised once, cells are sorted by token length and cut into batches, each batch is padded on the
left (so every prompt ends at the last position) with explicit position ids, and the model runs in
:func:`torch.inference_mode`. :func:`decode` extends a batch of prompts token by token over the KV cache; the
caller chooses the next token (greedy here, sampling for generation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from scanpy import logging as logg
from scanpy import settings

from sc_c2s import prompts

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sc_c2s.models import C2SModel

#: Cells per batch when `batch_size=None`: on a GPU, elsewhere.
DEFAULT_BATCH_SIZE_GPU, DEFAULT_BATCH_SIZE_CPU = 64, 8
#: Share of sentence genes outside the model's vocabulary above which the gene names probably do not match.
_UNKNOWN_WARNING = 0.5


class Batch(NamedTuple):
    """Prompts of some cells, padded on the left, on the model's device."""

    index: np.ndarray
    """Positions of the cells in the list of prompts."""
    input_ids: torch.Tensor
    """Token ids, batch × length, padded on the left."""
    attention_mask: torch.Tensor
    """1 for prompt tokens, 0 for padding."""
    position_ids: torch.Tensor
    """Position of each token within its own prompt (padding gets 0)."""


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int:
    """Check `batch_size`, or pick the default for `device` when it is ``None``."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE_GPU if device.type == "cuda" else DEFAULT_BATCH_SIZE_CPU
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        msg = f"`batch_size` must be a positive integer or None, got {batch_size!r}."
        raise ValueError(msg)
    return int(batch_size)


def check_n_genes(n_genes: int) -> int:
    """Check that `n_genes` is a positive integer."""
    if not isinstance(n_genes, int | np.integer) or n_genes < 1:
        msg = f"`n_genes` must be a positive integer, got {n_genes!r}."
        raise ValueError(msg)
    return int(n_genes)


def cell_words(adata: AnnData | MuData, c2s: C2SModel, *, n_genes: int, mod: str | None) -> list[list[str]]:
    """Return the genes of each cell's sentence, best first, cased as the model expects.

    Raises the error of :meth:`~sc_c2s._data.DataHandler.c2s` when :func:`sc_c2s.pp.to_sentences` has not run, and
    warns when most genes are outside the model's vocabulary.
    """
    words = prompts.sentence_words(adata, n_genes=check_n_genes(n_genes), mod=mod)
    case = str.upper if c2s.metadata.upper_case else str
    words = [[case(w) for w in cell] for cell in words]
    if c2s.metadata.vocabulary is not None:
        known = {case(w) for w in c2s.metadata.vocabulary}
        n_words = sum(map(len, words))
        share = sum(w not in known for cell in words for w in cell) / max(n_words, 1)
        if share > _UNKNOWN_WARNING:
            logg.warning(
                f"{share:.0%} of the sentence genes are not in the vocabulary of {c2s.name!r}: do the sentences use "
                "the gene names it was trained on (e.g. symbols, not Ensembl IDs; see `gene_symbols=` of "
                "`sc_c2s.pp.to_sentences`)?"
            )
    return words


def prediction_prompts(words: Sequence[Sequence[str]], *, organism: str) -> list[str]:
    """Build the cell-type prediction prompts of cells whose (already cased) sentence genes are `words`."""
    return [prompts.cell_type_prediction(cell, organism=organism, upper=False) for cell in words]


def tokenize(c2s: C2SModel, texts: Sequence[str], *, special_tokens: bool = True) -> list[list[int]]:
    """Tokenise each text, unpadded; prompts keep the tokenizer's special tokens (e.g. a BOS)."""
    return c2s.tokenizer(list(texts), add_special_tokens=special_tokens)["input_ids"]


def check_prompts(c2s: C2SModel, ids: Sequence[Sequence[int]], *, room: int = 0) -> None:
    """Refuse prompts longer than the model reads; `room` is the number of tokens that follow them (an answer)."""
    longest = max(map(len, ids), default=0) + room
    limit = getattr(c2s.model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        msg = (
            f"The longest prompt{' and answer' if room else ''} has {longest} tokens, but {c2s.name!r} reads at "
            f"most {limit}; lower `n_genes`."
        )
        raise ValueError(msg)


def left_pad(
    ids: Sequence[Sequence[int]], *, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token sequences on the left: input ids, attention mask and position ids, batch × longest."""
    import torch

    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        if len(seq):
            input_ids[row, width - len(seq) :] = torch.as_tensor(seq)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


def batches(
    ids: Sequence[Sequence[int]], *, batch_size: int, pad_id: int, device: torch.device, desc: str
) -> Iterator[Batch]:
    """Yield the prompts in batches of similar token length, longest first (a memory error shows at once).

    The progress bar counts cells; it is silent when scanpy's verbosity is ``0`` (errors only).
    """
    from tqdm.auto import tqdm

    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    with tqdm(total=len(ids), desc=desc, unit="cell", disable=settings.verbosity == 0) as bar:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield Batch(index, *left_pad([ids[i] for i in index], pad_id=pad_id, device=device))
            bar.update(len(index))


@contextmanager
def inference(model: PreTrainedModel) -> Iterator[None]:
    """Run the block in evaluation mode under :func:`torch.inference_mode`, then restore the training flag."""
    import torch

    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(training)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the padding token, or the end-of-sequence token for tokenizers without one (as Pythia's)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        msg = "The tokenizer has neither a padding nor an end-of-sequence token; set `tokenizer.pad_token`."
        raise ValueError(msg)
    return pad


def period_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """List the tokens that end an answer: end of sequence, and every token whose text ends with a period."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    stop = [i for i, text in enumerate(texts) if text.rstrip().endswith(".")]
    return sorted({*stop, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Pick the most likely next token of each row."""
    return logits.argmax(-1)


def decode(
    model: PreTrainedModel,
    batch: Batch,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    choose: Callable[[torch.Tensor], torch.Tensor] = greedy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue every prompt of `batch` until a stop token or `max_new_tokens`, reusing the KV cache.

    The prompt is read once; each step feeds one token per row. `choose` maps the next-token logits
    (rows × vocabulary) to the chosen tokens (rows).

    Returns
    -------
    The new tokens (rows × steps, `pad_id` after a row's stop token, which is kept) and the log-probability of
    each under the model (0 after the stop token).
    """
    import torch

    stop = torch.as_tensor(list(stop_ids), device=batch.input_ids.device)
    mask, positions = batch.attention_mask, batch.position_ids[:, -1:]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=mask,
        position_ids=batch.position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    done = torch.zeros(len(batch.index), dtype=torch.bool, device=stop.device)
    tokens, logps = [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        token = choose(logits).masked_fill(done, pad_id)
        logp = logits.float().log_softmax(-1).gather(1, token[:, None])[:, 0]
        tokens.append(token)
        logps.append(logp.masked_fill(done, 0.0))
        done |= torch.isin(token, stop)
        if done.all() or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)
        positions = positions + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return torch.stack(tokens, 1), torch.stack(logps, 1)
