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

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from scanpy import logging as logg

from sc_c2s._compat import cache_name
from sc_c2s._utils._progress import progress
from sc_c2s._utils._validate import check_positive_int

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

#: Cells per batch when `batch_size=None` off a GPU (on a GPU, batches are sized to its free memory).
DEFAULT_BATCH_SIZE_CPU = 8
#: Largest batch sized to the free memory of a GPU.
MAX_MEMORY_BATCH = 1024
#: Share of the free GPU memory that a batch sized to memory may take (the rest: the allocator's slack).
MEMORY_SHARE = 0.7


# --- device and dtype ---------------------------------------------------------------------------------------------


@contextmanager
def keep_random_state() -> Iterator[None]:
    """Give torch's global random state back as it was: CPU, CUDA and XPU devices in use, and MPS where there is one.

    Training seeds torch's global generators (CPU dropout and initial weights draw from them); a caller's own draws
    after it must not depend on our seed. Also a decorator, of the functions that seed them.
    """
    import torch

    saved = []  # (how to set it back, state) of the generators fork_rng leaves alone
    if torch.backends.mps.is_available():
        saved.append((torch.mps.set_rng_state, torch.mps.get_rng_state()))
    if torch.xpu.is_initialized():
        saved.append((torch.xpu.set_rng_state_all, torch.xpu.get_rng_state_all()))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for set_state, state in saved:
                set_state(state)


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch's global generators of the CPU and of `device`, and no others.

    :func:`torch.manual_seed` also seeds every other device, and queues a seed for a CUDA that has not started yet,
    which :func:`keep_random_state` cannot give back: the caller's own ``torch.manual_seed`` would be lost.
    """
    import torch

    torch.default_generator.manual_seed(seed)
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None  # torch.cuda, torch.mps, torch.xpu …
    seed_device = getattr(backend, "manual_seed_all", None) or getattr(backend, "manual_seed", None)
    if seed_device is not None:
        seed_device(seed)


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU (never MPS unless asked for)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | int | torch.device) -> torch.device:
    """Return `device` as a :class:`torch.device`, or raise a :class:`ValueError` if torch cannot run there.

    The message says what is wrong (not a device, the meta device, no CUDA or MPS, no such GPU, another accelerator
    that torch cannot use here, such as ``"xpu"`` without Intel GPUs) and what ``device=None`` picks.
    """
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None:
        why = "is not a torch device; pass e.g. 'cpu', 'cuda' or 'cuda:0'"
    elif resolved.type == "meta":
        why = "holds no weights (meta tensors have shapes only): a model cannot run there, nor come back"
        why += "; pass 'cpu' or 'cuda'"
    elif resolved.type == "cuda" and not torch.cuda.is_available():
        build = "is built without CUDA" if torch.version.cuda is None else "sees no GPU"
        why = f"but no CUDA device is available (torch {torch.__version__} {build})"
    elif resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count() > 0:
        why = f"but torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        why = "but MPS (Apple GPUs) is not available"
    elif resolved.type not in ("cpu", "cuda", "mps") and not _backend_available(resolved.type):
        why = f"but torch {torch.__version__} cannot run on {resolved.type!r} devices here; pass 'cpu', 'cuda' or 'mps'"
    else:
        return resolved
    msg = f"`device={device!r}` {why}; `device=None` picks {default_device()} here."
    raise ValueError(msg)


def _backend_available(device_type: str) -> bool:
    """Whether torch has a backend module for `device_type` (``torch.xpu``) that says it is available."""
    import torch

    is_available = getattr(getattr(torch, device_type, None), "is_available", None)
    return callable(is_available) and bool(is_available())


def device_and_dtype(
    device: str | torch.device | None, dtype: str | torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Choose the device and dtype to run on: CUDA in bfloat16 when there is a GPU, else the CPU in float32.

    bfloat16 falls back to float16 on GPUs without it; a given `device` is checked by :func:`check_device`, a given
    `dtype` (a :class:`torch.dtype` or its name) to be one that weights load in: float16, bfloat16, float32 or
    float64 (not the float8 types, which only quantisation schemes use).
    """
    import torch

    device = check_device(device) if device is not None else default_device()
    if dtype is None:
        if device.type != "cuda":
            return device, torch.float32
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        msg = f"`dtype` must be a floating-point torch dtype such as torch.bfloat16 or 'float32', got {dtype!r}."
        raise ValueError(msg)
    if device.type == "mps" and resolved == torch.float64:
        msg = "MPS has no float64; pass `dtype='float32'` (or leave it out), or `device='cpu'`."
        raise ValueError(msg)
    return device, resolved


def model_device(model: PreTrainedModel) -> torch.device:
    """Device the weights of `model` live on."""
    return next(model.parameters()).device


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int | None:
    """Check `batch_size`; for ``None``, the default off a GPU, and ``None`` (sized to memory) on one."""
    if batch_size is None:
        return None if sizes_to_memory(device) else DEFAULT_BATCH_SIZE_CPU
    return check_positive_int(batch_size, "batch_size")


def sizes_to_memory(device: torch.device) -> bool:
    """Whether batches on `device` are sized to its free memory (on CUDA GPUs)."""
    return device.type == "cuda"


def free_memory(device: torch.device) -> int:
    """Bytes a batch may take on a GPU: free memory, and what PyTorch's allocator holds but does not use."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def sequence_bytes(model: PreTrainedModel, n_tokens: int) -> float:
    """Memory one sequence of `n_tokens` tokens takes in a batch (see :func:`sc_c2s.models._memory.activations`)."""
    from . import _memory

    config = model.config.get_text_config()
    shape = _memory.shape(config.to_dict())
    eager = model.config._attn_implementation == "eager"
    if shape is not None:
        return _memory.activations(shape, tokens=n_tokens, bytes_per_value=model.dtype.itemsize, eager=eager)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    cache = 2 * config.num_hidden_layers * n_kv_heads * head_dim * n_tokens
    return (cache + 16 * config.hidden_size * n_tokens) * model.dtype.itemsize + eager * n_heads * n_tokens**2 * 4


def memory_batch_size(model: PreTrainedModel, n_tokens: int) -> int:
    """As many sequences of `n_tokens` tokens as fit into part of the free GPU memory."""
    free = free_memory(model_device(model))
    return int(np.clip(MEMORY_SHARE * free // sequence_bytes(model, n_tokens), 1, MAX_MEMORY_BATCH))


# --- loading and tokens -------------------------------------------------------------------------------------------


def from_pretrained(
    path: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | None = None,
    quantization: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Read the tokenizer and causal LM of a checkpoint directory, never running code shipped with it.

    With `quantization` (``"8bit"`` or ``"4bit"``, through bitsandbytes) the weights are quantised as they are
    read, straight onto `device`. `attn_implementation` ``None`` lets transformers choose (SDPA where the model
    supports it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    if quantization is not None:
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        options |= {"quantization_config": quantization_config(quantization, dtype), "device_map": {"": index}}
    with no_transformers_bars():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=False, **options
        )
    return tokenizer, model


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """Hide transformers' own progress bars (loading and writing weights), which say nothing a user needs."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def quantization_config(quantization: str, dtype: torch.dtype):
    """Bitsandbytes settings: LLM.int8 for ``"8bit"``; for ``"4bit"``, NF4, double-quantised, computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, path: Path) -> None:
    """Pad on the left with a padding token the model knows, and check the tokenizer fits the model."""
    n_tokens, n_rows = len(tokenizer), model.get_input_embeddings().num_embeddings
    if not n_rows // 2 <= n_tokens <= n_rows:
        if not (path / "tokenizer_config.json").is_file():  # transformers then guesses the tokenizer's settings
            why = "tokenizer_config.json is missing, without which transformers guesses the tokenizer's settings"
        elif (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
            why = (
                'a SentencePiece `tokenizer.model`, as Gemma checkpoints have, needs `pip install "sc-c2s[gemma]"` '
                "(sentencepiece and protobuf)"
            )
        else:
            why = "they do not belong together"
        msg = f"The tokenizer of {path} has {n_tokens} tokens but the model embeds {n_rows}: {why}."
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


def tokenize_spans(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], char_spans: np.ndarray
) -> tuple[list[list[int]], np.ndarray]:
    """Tokenise each text (with special tokens) and find the tokens that cover its span of characters.

    `char_spans` holds the start and end (exclusive) of a span of characters in each text. The tokens that
    cover at least one of its characters (by the tokenizer's offsets) make the token span, start and end
    (exclusive), texts × 2. A token that crosses an end of the span, as tokenizers that merge across words
    make, is in it.
    """
    if not getattr(tokenizer, "is_fast", False):
        msg = (
            f"Finding tokens by their characters needs a fast tokenizer (of the `tokenizers` library), not a "
            f"{type(tokenizer).__name__}."
        )
        raise TypeError(msg)
    spans = np.empty((len(texts), 2), dtype=np.int64)
    if not texts:  # the tokenizer fails on no text
        return [], spans
    encoded = tokenizer(list(texts), return_offsets_mapping=True)
    for i, (offsets, (start, end)) in enumerate(zip(encoded["offset_mapping"], char_spans, strict=True)):
        offsets = np.asarray(offsets).reshape(-1, 2)
        covers = np.flatnonzero((offsets[:, 1] > offsets[:, 0]) & (offsets[:, 0] < end) & (offsets[:, 1] > start))
        if not len(covers):
            msg = f"No token of text {i} covers its characters {start}:{end}."
            raise ValueError(msg)
        spans[i] = covers[0], covers[-1] + 1
    return encoded["input_ids"], spans


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest sequence the model takes: its positions, or the tokenizer's limit when that is smaller."""
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return int(min(limit, tokenizer.model_max_length))


def check_context(
    model: PreTrainedModel, ids: Sequence[Sequence[int]], *, name: str, room: int = 0, cells: str | None = None
) -> None:
    """Refuse prompts longer than the model reads.

    `room` is the number of tokens that follow them (an answer); `cells` names the argument that sets how many
    cells a prompt or answer holds (``"n_cells"``), which the message then offers to lower too.
    """
    longest = max(map(len, ids), default=0) + room
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        msg = (
            f"The longest prompt{' and answer' if room else ''} has {longest} tokens, but {name!r} reads at "
            f"most {limit}; lower `n_genes`{f' (or `{cells}`, the cells of a group)' if cells else ''}."
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


def stack_right_aligned(sequences: Sequence[Sequence[int] | np.ndarray], *, fill: int) -> torch.Tensor:
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
    input_ids = stack_right_aligned(ids, fill=pad_id)
    mask = stack_right_aligned([np.ones(len(seq), dtype=np.int64) for seq in ids], fill=0)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    if device is None:
        return input_ids, mask, positions
    return input_ids.to(device), mask.to(device), positions.to(device)


def run_batches(
    model: PreTrainedModel,
    ids: Sequence[Sequence[int]],
    work: Callable[[Batch], None],
    *,
    batch_size: int | None,
    pad_id: int,
    desc: str | None,
    room: int = 0,
    unit: str = "cell",
) -> None:
    """Call `work` on the prompts in batches of similar token length, longest first (a memory error shows at once).

    `work` keeps the results of each batch. With `batch_size` ``None`` (on a GPU), each batch takes as many cells
    as fit into the free memory with their prompt and `room` more tokens (a generated answer). When a batch runs
    out of GPU memory, its cells are tried again in batches half as large, and the batches after it are no larger;
    the cells of the batches before it are done. The progress bar counts prompts (as `unit`) and follows
    :func:`sc_c2s._utils._progress.show_progress`; `desc` ``None`` hides it.
    """
    import torch

    device = model_device(model)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    cap, start, warned = MAX_MEMORY_BATCH if batch_size is None else batch_size, 0, False
    with progress(total=len(ids), desc=desc, unit=unit) as bar:
        while start < len(order):
            size = batch_size or memory_batch_size(model, int(lengths[order[start]]) + room)
            index = order[start : start + min(size, cap)]
            try:
                work(Batch(index, *left_pad([ids[i] for i in index], pad_id=pad_id, device=device)))
            except torch.OutOfMemoryError:
                if len(index) == 1:
                    raise
                cap = len(index) // 2
            else:
                start += len(index)
                bar.update(len(index))
                continue
            if not warned:  # out of the `except` block, the failed batch's tensors are free
                logg.warning(f"out of GPU memory with {len(index)} cells per batch; going on with at most {cap}")
                warned = True
            torch.cuda.empty_cache()


# --- forward passes -----------------------------------------------------------------------------------------------


#: Models inside :func:`inference`, by id: how many threads are, and the training flag to restore after the last.
_IN_INFERENCE: dict[int, list] = {}
_IN_INFERENCE_LOCK = threading.Lock()


@contextmanager
def inference(model: PreTrainedModel) -> Iterator[None]:
    """Run the block in evaluation mode under :func:`torch.inference_mode`, then restore the training flag.

    Threads that run the same model at once (Dask's threads in this process) share its flag: it is restored when the
    last of them leaves, so that none runs on in training mode (dropout) after another has left.
    """
    import torch

    with _IN_INFERENCE_LOCK:
        entry = _IN_INFERENCE.setdefault(id(model), [0, model.training])
        entry[0] += 1
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        with _IN_INFERENCE_LOCK:
            entry[0] -= 1
            if not entry[0]:
                del _IN_INFERENCE[id(model)]
                model.train(entry[1])


def new_cache() -> Cache:
    """Make an empty KV cache that keeps every layer whole, so that it can be cut back (sliding-window layers too)."""
    from transformers import DynamicCache

    return DynamicCache()


def takes_custom_masks(model: PreTrainedModel) -> bool:
    """Whether the model's attention reads a 4-D mask of its own (SDPA and eager do, FlashAttention-2 does not)."""
    return model.config._attn_implementation in {"eager", "sdpa"}


def sliding_window(model: PreTrainedModel) -> int | None:
    """Tokens a sliding-window attention layer of the model sees (Gemma 2: 4096), or ``None`` without such layers."""
    config = model.config.get_text_config()
    if getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(config, "sliding_window", None)


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


def last_hidden_state(
    model: PreTrainedModel, input_ids: torch.Tensor, *, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """Return the final hidden states (after the last layer norm) of every position: what the output layer reads."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA adapter
    return causal_lm.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def mean_hidden_state(model: PreTrainedModel, batch: Batch, spans: np.ndarray) -> np.ndarray:
    """Mean final hidden state (after the last layer norm) over a span of each prompt of `batch`, as float32.

    `spans` holds the start and end (exclusive) of each row's span, counted from its first token (not from the
    padding before it).
    """
    import torch

    hidden = last_hidden_state(
        model, batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
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
