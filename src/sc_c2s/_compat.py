"""Shims over dependency versions, so that a rename upstream is one edit here."""

from __future__ import annotations

import json
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@cache
def cache_name() -> str:
    """Name of the KV cache in the forward call and output of a transformers causal LM.

    transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns, then goes in 5.40); both the
    keyword argument and the output field follow the name of ``CausalLMOutputWithPast``'s field.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def fused_adamw(device: torch.device) -> bool:
    """Whether PyTorch's fused AdamW, one kernel per parameter for the whole update, runs on `device`.

    CUDA has it in every release allowed here, the CPU from torch 2.4. On the CPU it takes the update of a
    from-scratch model from about 7 ms to 4 ms a step (of 550 ms on 2 cores), in one pass over each parameter
    instead of some ten.
    """
    import torch

    return device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= "2.4")


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpointing).

    transformers 5.x renames ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
    name warns, then goes in 6.0).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def portable_tokenizer_config(directory: Path) -> None:
    """Name the tokenizer class of a saved checkpoint so that transformers 4.x can read it too.

    transformers 5 saves a tokenizer built on the `tokenizers` library as ``TokenizersBackend``, a class that 4.x
    lacks; ``PreTrainedTokenizerFast`` is the same tokenizer in both.
    """
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
