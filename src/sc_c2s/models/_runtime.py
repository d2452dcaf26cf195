"""The model runtime: everything that touches transformers, for inference with any C2S model.

Tokenising, the pad and stop tokens, left padding with position ids, batches of similar length, the forward
call with and without a KV cache, the decode loop, the device and dtype to run on. The verbs of
:mod:`sc_c2s.tl` call these and keep only their own logic, so a change in transformers is one edit here (or in
:mod:`sc_c2s._compat`). Training lives beside it in :mod:`sc_c2s.models._trainer`, scoring candidate answers in
:mod:`sc_c2s.models._candidates`.

Prompts are tokenised once, cells are sorted by token length and cut into batches, each batch is padded on the
left (so every prompt ends at the last position) with explicit position ids, and the model runs in
:func:`torch.inference_mode`. :func:`decode` extends a batch of prompts token by token over the KV cache; the
caller chooses the next token (greedy by default, sampling for generation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sc_c2s._compat import cache_name
from sc_c2s._utils._progress import progress
from sc_c2s._utils._validate import check_positive_int

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

#: Cells per batch when `batch_size=None`: on a GPU, elsewhere.
DEFAULT_BATCH_SIZE_GPU, DEFAULT_BATCH_SIZE_CPU = 64, 8
#: Largest batch sized to the free memory of a GPU.
MAX_MEMORY_BATCH = 1024
#: Share of the free GPU memory that the key/value cache of a batch sized to memory may take.
MEMORY_SHARE = 0.5


# --- device and dtype ---------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU (never MPS unless asked for)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | int | torch.device) -> torch.device:
    """Return `device` as a :class:`torch.device`, or raise a :class:`ValueError` if torch cannot run there.

    The message says what is wrong (not a device, no CUDA or MPS, no such GPU) and what ``device=None`` picks.
    """
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None:
        why = "is not a torch device; pass e.g. 'cpu', 'cuda' or 'cuda:0'"
    elif resolved.type == "cuda" and not torch.cuda.is_available():
        build = "is built without CUDA" if torch.version.cuda is None else "sees no GPU"
        why = f"but no CUDA device is available (torch {torch.__version__} {build})"
    elif resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count() > 0:
        why = f"but torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        why = "but MPS (Apple GPUs) is not available"
    else:
        return resolved
    msg = f"`device={device!r}` {why}; `device=None` picks {default_device()} here."
    raise ValueError(msg)


def device_and_dtype(
    device: str | torch.device | None, dtype: str | torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Choose the device and dtype to run on: CUDA in bfloat16 when there is a GPU, else the CPU in float32.

    bfloat16 falls back to float16 on GPUs without it; a given `device` is checked by :func:`check_device`, a given
    `dtype` (a :class:`torch.dtype` or its name) to be floating point.
    """
    import torch

    device = check_device(device) if device is not None else default_device()
    if dtype is None:
        if device.type != "cuda":
            return device, torch.float32
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        msg = f"`dtype` must be a floating-point torch dtype such as torch.bfloat16 or 'float32', got {dtype!r}."
        raise ValueError(msg)
    return device, resolved


def model_device(model: PreTrainedModel) -> torch.device:
    """Device the weights of `model` live on."""
    return next(model.parameters()).device


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int:
    """Check `batch_size`, or pick the default for `device` when it is ``None``."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE_GPU if device.type == "cuda" else DEFAULT_BATCH_SIZE_CPU
    return check_positive_int(batch_size, "batch_size", none_ok=True)


def memory_batch_size(model: PreTrainedModel, n_tokens: int) -> int:
    """As many sequences as let the key/value cache of `n_tokens` tokens each fill part of the free GPU memory."""
    import torch

    config = model.config.get_text_config()
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    per_sequence = 2 * config.num_hidden_layers * n_kv_heads * head_dim * model.dtype.itemsize * n_tokens
    free, _ = torch.cuda.mem_get_info(model_device(model))
    return int(np.clip(MEMORY_SHARE * free // per_sequence, 1, MAX_MEMORY_BATCH))


# --- loading and tokens -------------------------------------------------------------------------------------------


def from_pretrained(path: Path, *, dtype: torch.dtype) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Read the tokenizer and causal LM of a checkpoint directory, never running code shipped with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers' own progress bars while loading weights say nothing a user needs
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, trust_remote_code=False)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
    return tokenizer, model


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, path: Path) -> None:
    """Pad on the left with a padding token the model knows, and check the tokenizer fits the model."""
    n_tokens, n_rows = len(tokenizer), model.get_input_embeddings().num_embeddings
    if not n_rows // 2 <= n_tokens <= n_rows:
        msg = (
            f"The tokenizer of {path} has {n_tokens} tokens but the model embeds {n_rows}: they do not belong "
            "together, or the tokenizer was not read correctly (a SentencePiece `tokenizer.model`, as Gemma "
            "checkpoints have, needs `pip install sentencepiece protobuf`)."
        )
        raise ValueError(msg)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id(tokenizer))
    for config in (model.config, model.generation_config):
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the padding token, or the end-of-sequence token for tokenizers without one (as Pythia's)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        msg = "The tokenizer has neither a padding nor an end-of-sequence token to pad with; set `tokenizer.pad_token`."
        raise ValueError(msg)
    return pad


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the end-of-sequence token, which ends every training answer."""
    if tokenizer.eos_token_id is None:
        msg = "The tokenizer has no EOS token, so a trained model could not say where its answer ends."
        raise ValueError(msg)
    return tokenizer.eos_token_id


def period_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """List the tokens that end an answer: end of sequence, and every token whose text ends with a period."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    stop = [i for i, text in enumerate(texts) if text.rstrip().endswith(".")]
    return sorted({*stop, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, special_tokens: bool = True
) -> list[list[int]]:
    """Tokenise each text, unpadded; prompts keep the tokenizer's special tokens (e.g. a BOS), answers do not."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=special_tokens)["input_ids"]


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest sequence the model takes: its positions, or the tokenizer's limit when that is smaller."""
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return int(min(limit, tokenizer.model_max_length))


def check_context(model: PreTrainedModel, ids: Sequence[Sequence[int]], *, name: str, room: int = 0) -> None:
    """Refuse prompts longer than the model reads; `room` is the number of tokens that follow them (an answer)."""
    longest = max(map(len, ids), default=0) + room
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        msg = (
            f"The longest prompt{' and answer' if room else ''} has {longest} tokens, but {name!r} reads at "
            f"most {limit}; lower `n_genes`."
        )
        raise ValueError(msg)


# --- batches ------------------------------------------------------------------------------------------------------


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


def pad_left(sequences: Sequence[Sequence[int] | np.ndarray], *, fill: int) -> torch.Tensor:
    """Stack sequences into a batch × longest tensor, each right-aligned, `fill` before it."""
    import torch

    width = max(map(len, sequences))
    out = torch.full((len(sequences), width), fill, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            out[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
    return out


def left_pad(
    ids: Sequence[Sequence[int] | np.ndarray], *, pad_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token sequences on the left: input ids, attention mask and position ids, batch × longest.

    Position ids count from each sequence's first token, so padding changes nothing.
    """
    input_ids = pad_left(ids, fill=pad_id)
    mask = pad_left([np.ones(len(seq), dtype=np.int64) for seq in ids], fill=0)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    if device is None:
        return input_ids, mask, positions
    return input_ids.to(device), mask.to(device), positions.to(device)


def batches(
    ids: Sequence[Sequence[int]], *, batch_size: int, pad_id: int, device: torch.device, desc: str
) -> Iterator[Batch]:
    """Yield the prompts in batches of similar token length, longest first (a memory error shows at once).

    The progress bar counts cells and follows :func:`sc_c2s._utils._progress.show_progress`.
    """
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    with progress(total=len(ids), desc=desc, unit="cell") as bar:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield Batch(index, *left_pad([ids[i] for i in index], pad_id=pad_id, device=device))
            bar.update(len(index))


# --- forward passes -----------------------------------------------------------------------------------------------


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


def forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache | None = None,
    use_cache: bool = False,
    logits_to_keep: int = 0,
) -> tuple[torch.Tensor, Cache | None]:
    """Run the causal LM: the logits of the last `logits_to_keep` positions (``0``: all), and the KV cache.

    `cache` holds earlier tokens to continue from; with `use_cache` the cache after these tokens comes back
    (else ``None``). The cache goes by the name the installed transformers expects.
    """
    name = cache_name()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        logits_to_keep=logits_to_keep,
        **({name: cache} if cache is not None else {}),
    )
    return out.logits, getattr(out, name) if use_cache else None


def mean_hidden_state(model: PreTrainedModel, batch: Batch, spans: np.ndarray) -> np.ndarray:
    """Mean final hidden state (after the last layer norm) over a span of each prompt of `batch`, as float32.

    `spans` holds the start and end (exclusive) of each row's span, counted from its first token (not from the
    padding before it).
    """
    import torch

    hidden = model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    offset = batch.attention_mask.shape[1] - batch.attention_mask.sum(1, keepdim=True)
    spans = torch.as_tensor(spans, device=hidden.device) + offset
    columns = torch.arange(hidden.shape[1], device=hidden.device)[None]
    inside = ((columns >= spans[:, :1]) & (columns < spans[:, 1:])).to(torch.float32)
    total = torch.einsum("bl,blh->bh", inside, hidden.float())
    return (total / inside.sum(1, keepdim=True)).cpu().numpy()


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
    logits, cache = forward(
        model,
        batch.input_ids,
        attention_mask=mask,
        position_ids=batch.position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    done = torch.zeros(len(batch.index), dtype=torch.bool, device=stop.device)
    tokens, logps = [], []
    for step in range(max_new_tokens):
        logits = logits[:, -1]
        token = choose(logits).masked_fill(done, pad_id)
        logp = logits.float().log_softmax(-1).gather(1, token[:, None])[:, 0]
        tokens.append(token)
        logps.append(logp.masked_fill(done, 0.0))
        done |= torch.isin(token, stop)
        if done.all() or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)
        positions = positions + 1
        logits, cache = forward(
            model, token[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
    return torch.stack(tokens, 1), torch.stack(logps, 1)
