"""How much memory a checkpoint needs, estimated from its architecture before anything is downloaded.

The estimate counts the weights (linear layers at the width of the chosen precision; embeddings, norms and the
output layer in 16 bits, as bitsandbytes leaves them), the key/value cache and the largest activations of one
layer for a batch, and a fixed allowance for the CUDA context and the allocator. For fine-tuning with LoRA it
adds the adapter with its gradients and AdamW state, the hidden states kept by gradient checkpointing, one
layer's activations recomputed in the backward pass, and the float32 logits of the answer tokens with their
gradients. It is an estimate of the order of magnitude that decides what fits where, not a measurement.

The architectures of the published checkpoints are in :data:`ARCHITECTURES`, so that :func:`sc_c2s.models.load`
can refuse a checkpoint the device cannot hold before downloading it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sc_c2s._utils._validate import available_memory

if TYPE_CHECKING:
    import torch

Quantization = Literal["8bit", "4bit"]
QUANTIZATIONS: tuple[str, ...] = ("8bit", "4bit")

#: Configurations (``config.json`` values that set the size) of the base models of the published checkpoints.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "EleutherAI/pythia-160m": {
        "model_type": "gpt_neox",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 50304,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
    },
    "EleutherAI/pythia-410m": {
        "model_type": "gpt_neox",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "vocab_size": 50304,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
    },
    "EleutherAI/pythia-1b": {
        "model_type": "gpt_neox",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 50304,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
    },
    "google/gemma-2-2b": {
        "model_type": "gemma2",
        "hidden_size": 2304,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "intermediate_size": 9216,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "google/gemma-2-27b": {
        "model_type": "gemma2",
        "hidden_size": 4608,
        "num_hidden_layers": 46,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 128,
        "intermediate_size": 36864,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "sliding_window": 4096,
        "query_pre_attn_scalar": 144,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
}

#: Bytes per weight of a linear layer: 16-bit, bitsandbytes LLM.int8, and NF4 with its double-quantised scales.
_LINEAR_BYTES = {None: 2.0, "8bit": 1.0, "4bit": 0.5 + 0.127 / 8}
#: The CUDA context, PyTorch's allocator and what a batch leaves around: a fixed allowance, in bytes.
_OVERHEAD = 1.0 * 2**30
#: Batch the estimates of :func:`available` assume: cells (or training samples) × tokens each.
BATCH, TOKENS = 8, 1024
#: Share of a training sample's tokens that are answer tokens, whose logits the loss needs.
_ANSWER_SHARE = 0.5
#: LoRA rank the estimates assume (:func:`sc_c2s.tl.finetune`'s default).
LORA_RANK = 16


@dataclass(frozen=True)
class Shape:
    """What sets the memory of a causal LM: its parameters and the width of its cache and activations."""

    n_linear: int
    """Parameters in the linear layers of the decoder layers (what 8-bit and 4-bit loading shrink)."""
    n_other: int
    """Other parameters: embeddings, output layer, norms, biases."""
    n_layers: int
    hidden: int
    intermediate: int
    kv_width: int
    """Keys and values per token and layer: key/value heads × head size."""
    n_heads: int
    vocab: int
    eager: bool
    """Whether attention runs eagerly (Gemma 2, whose soft-capping SDPA cannot do): attention scores in memory."""
    lora_targets: tuple[tuple[int, int], ...]
    """(in, out) features of the linear layers LoRA adapts, per decoder layer."""

    @property
    def n_parameters(self) -> int:
        return self.n_linear + self.n_other

    @property
    def n_lora(self) -> int:
        """Parameters of a LoRA adapter of rank :data:`LORA_RANK` on the default target modules."""
        return self.n_layers * sum(LORA_RANK * (i + o) for i, o in self.lora_targets)


def shape(config: Mapping[str, Any]) -> Shape | None:
    """Read the :class:`Shape` from a ``config.json`` of a GPT-NeoX or a Gemma 2 model (``None`` for others)."""
    kind = config.get("model_type")
    config = config.get("text_config", config) if kind not in {"gpt_neox", "gemma2"} else config
    kind = config.get("model_type")
    if kind not in {"gpt_neox", "gemma2"}:
        return None
    h, n_layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    inter, n_heads = config["intermediate_size"], config["num_attention_heads"]
    if kind == "gpt_neox":
        targets = ((h, 3 * h), (h, h), (h, inter), (inter, h))  # query_key_value, dense, MLP in, MLP out
        n_linear = n_layers * sum(i * o for i, o in targets)
        biases, norms = n_layers * (3 * h + h + inter + h), n_layers * 4 * h + 2 * h
        untied = not config.get("tie_word_embeddings", False)
        n_other = vocab * h * (1 + untied) + biases + norms
        return Shape(n_linear, n_other, n_layers, h, inter, h, n_heads, vocab, False, targets)
    head = config.get("head_dim") or h // n_heads
    n_kv = config.get("num_key_value_heads") or n_heads
    q, kv = n_heads * head, n_kv * head
    targets = ((h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h))
    n_linear = n_layers * sum(i * o for i, o in targets)
    n_other = vocab * h + n_layers * 4 * h + h  # tied embeddings, four norms per layer and the final one
    return Shape(n_linear, n_other, n_layers, h, inter, kv, n_heads, vocab, True, targets)


def weights(s: Shape, *, quantization: str | None = None, bytes_per_weight: float = 2.0) -> float:
    """Bytes of the weights: 16-bit (or `bytes_per_weight`) everywhere, or quantised linear layers."""
    if quantization is None:
        return s.n_parameters * bytes_per_weight
    return s.n_linear * _LINEAR_BYTES[quantization] + s.n_other * 2.0


def inference(
    s: Shape,
    *,
    quantization: str | None = None,
    bytes_per_weight: float = 2.0,
    batch: int = BATCH,
    tokens: int = TOKENS,
) -> float:
    """Bytes to read prompts of `tokens` tokens in batches of `batch` cells: weights, cache, one layer at work."""
    width = 2.0 if quantization is not None else bytes_per_weight
    per_batch = batch * activations(s, tokens=tokens, bytes_per_value=width)
    return weights(s, quantization=quantization, bytes_per_weight=bytes_per_weight) + per_batch


def activations(s: Shape, *, tokens: int, bytes_per_value: float = 2.0, eager: bool | None = None) -> float:
    """Bytes one sequence of `tokens` tokens takes in a batch.

    Its key/value cache, one layer's activations (with the attention scores of eager attention, by default where
    the model needs it, as Gemma 2), and its last logits.
    """
    cache = 2 * s.n_layers * s.kv_width * bytes_per_value * tokens
    layer = tokens * (4 * s.hidden + 3 * s.intermediate) * bytes_per_value
    scores = s.n_heads * tokens**2 * 4 if (s.eager if eager is None else eager) else 0
    return cache + layer + scores + s.vocab * 4 * 2


def lora(s: Shape, *, quantization: str | None = None) -> float:
    """Bytes to train a LoRA adapter (QLoRA with `quantization`) on a 16-bit base, with gradient checkpointing.

    For batches of :data:`BATCH` samples of :data:`TOKENS` tokens.
    """
    adapter = s.n_lora * (4 + 4 + 8)  # float32 weights, gradients, AdamW's two moments
    kept = s.n_layers * BATCH * TOKENS * s.hidden * 2  # the input of each layer, kept for the backward pass
    layer = 3 * BATCH * TOKENS * (4 * s.hidden + 3 * s.intermediate) * 2  # one layer recomputed, with gradients
    scores = 3 * BATCH * s.n_heads * TOKENS**2 * 4 if s.eager else 0
    logits = BATCH * TOKENS * _ANSWER_SHARE * s.vocab * (2 + 4 + 4)  # bf16 logits, float32 copy and gradient
    # peft prepares a quantised base by casting what is not quantised (embeddings, norms) to float32
    upcast = s.n_other * 2 if quantization is not None else 0
    return weights(s, quantization=quantization) + upcast + adapter + kept + layer + scores + logits


def estimates(s: Shape) -> dict[str, float]:
    """Memory (GiB) for inference in 16-bit, 8-bit and 4-bit, and for LoRA and QLoRA (4-bit) fine-tuning."""
    table = {
        "inference_bf16": inference(s),
        "inference_8bit": inference(s, quantization="8bit"),
        "inference_4bit": inference(s, quantization="4bit"),
        "lora_bf16": lora(s),
        "qlora_4bit": lora(s, quantization="4bit"),
    }
    return {key: round((value + _OVERHEAD) / 2**30, 1) for key, value in table.items()}


def check_quantization(quantization: str | None) -> str | None:
    """Return a valid `quantization`, else raise an error that lists the choices."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        msg = f"`quantization` must be None, '8bit' or '4bit', got {quantization!r}."
        raise ValueError(msg)
    return quantization


def capacity(device: torch.device) -> int | None:
    """Bytes free on `device`; ``None``: unknown.

    Free GPU memory, or for the CPU the memory available to this process, within a container's limit
    (:func:`~sc_c2s._utils._validate.available_memory`).
    """
    import torch

    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError as error:  # CUDA found no room for its own context on the GPU
            if "out of memory" not in str(error):
                raise
            msg = (
                f"CUDA cannot start on {device}: its memory is full. Other processes hold it (`nvidia-smi` lists "
                "them): a Dask worker beside a session that used the same GPU, say. In a process of yours that "
                "used the GPU, `torch.cuda.empty_cache()` hands back the memory PyTorch keeps cached."
            )
            raise MemoryError(msg) from error
    if device.type != "cpu":
        return None
    return available_memory()


def check_fits(
    s: Shape | None,
    *,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None,
) -> None:
    """Refuse a model that cannot fit on `device`, even for one cell at a time, with what would fit instead.

    ``SC_C2S_SKIP_MEMORY_CHECK=1`` (or ``true``, ``yes``, ``on``) skips the check, for devices whose free memory is
    misreported; ``0`` keeps it.
    """
    if s is None or os.environ.get("SC_C2S_SKIP_MEMORY_CHECK", "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    free = capacity(device)
    if free is None:
        return
    needed = inference(s, quantization=quantization, bytes_per_weight=dtype.itemsize, batch=1) + _OVERHEAD / 2
    if needed <= free:
        return
    precision = quantization or str(dtype).removeprefix("torch.")
    if device.type == "cuda" and quantization != "4bit":
        four = (inference(s, quantization="4bit", batch=1) + _OVERHEAD / 2) / 2**30
        fix = f"Load it in 4-bit (`quantization='4bit'`, about {math.ceil(four)} GiB), free memory or use a larger GPU"
    else:
        fix = "Free memory or use a device with more"
    msg = (
        f"{name} needs at least {needed / 2**30:.1f} GiB on {device} in {precision} ({s.n_parameters / 1e9:.2f}B "
        f"parameters), but {free / 2**30:.1f} GiB are free. {fix}; `sc_c2s.models.available()` lists what each "
        "checkpoint needs. (Set SC_C2S_SKIP_MEMORY_CHECK=1 to load anyway.)"
    )
    raise MemoryError(msg)
