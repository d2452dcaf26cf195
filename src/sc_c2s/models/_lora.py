"""LoRA adapters (with peft): adding one to a model for training, saving it alone, applying it to its base.

An adapter checkpoint holds the adapter's weights (``adapter_model.safetensors``, ``adapter_config.json``) and
``c2s_metadata.json``, whose ``adapter`` field names the base model (registry name or path, revision and the
sha256 of its files). :func:`sc_c2s.models.load` opens the base from there and applies the adapter.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sc_c2s._compat import enable_activation_checkpointing
from sc_c2s._utils._optional import import_optional

from ._runtime import keep_random_state, model_device, seed_torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: File that marks an adapter checkpoint (written by peft).
ADAPTER_CONFIG = "adapter_config.json"
#: The adapter's weights (written by peft).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Linear layers LoRA adapts by default, per architecture (``model_type``): every projection of attention and MLP.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    **dict.fromkeys(
        ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
}
#: Parameters from which a base model is trained with gradient checkpointing by default.
CHECKPOINTING_FROM = 1e9


def peft():
    """Import peft, or say how to install it."""
    return import_optional("peft", extra="lora", purpose="LoRA fine-tuning and adapter checkpoints")


def is_adapter_dir(path: Path) -> bool:
    """Whether a checkpoint directory holds an adapter rather than a whole model."""
    return (path / ADAPTER_CONFIG).is_file()


def is_adapted(model) -> bool:
    """Whether `model` is a base model with an adapter (a peft model).

    A model that an adapter was merged into keeps a ``peft_config`` attribute in some transformers versions, so
    the class decides; without peft imported, no model can be adapted.
    """
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def default_targets(model: PreTrainedModel) -> list[str] | str:
    """Target modules for `model`'s architecture: its attention and MLP projections, else all linear layers."""
    targets = DEFAULT_TARGETS.get(model.config.model_type)
    return list(targets) if targets is not None else "all-linear"


@keep_random_state()
def add_lora(
    model: PreTrainedModel,
    *,
    rank: int,
    target_modules: Sequence[str] | None,
    gradient_checkpointing: bool,
    quantized: bool,
    seed: int,
):
    """Wrap `model` in a LoRA adapter to train: its own weights frozen, the adapter's in float32.

    The scale ``alpha`` is twice the rank, dropout 0.05. The adapter's initial weights are drawn from torch's
    global generator seeded with `seed` (the caller's random state is given back after). A quantised base (QLoRA)
    is prepared as peft recommends (norms in float32, inputs that carry gradients).
    """
    lib = peft()
    if quantized:  # norms in float32, frozen weights; checkpointing is ours, non-reentrant
        model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    targets = list(target_modules) if target_modules is not None else default_targets(model)
    config = lib.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    seed_torch(seed, model_device(model))
    with _peft_warnings():
        return lib.get_peft_model(model, config, autocast_adapter_dtype=True)


@contextmanager
def _peft_warnings() -> Iterator[None]:
    """Silence what peft's wrapping warns about that no caller can change."""
    with warnings.catch_warnings():
        # peft (0.21) reads transformers' `is_gradient_checkpointing`, deprecated in transformers 5
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def targets(model) -> list[str]:
    """Names of the modules an adapted model's adapter targets."""
    return sorted(model.peft_config["default"].target_modules)


def save_adapter(model, directory: Path) -> None:
    """Write the adapter's weights and configuration only (no model card)."""
    readme = directory / "README.md"
    existed = readme.exists()
    model.save_pretrained(directory)
    if readme.exists() and not existed:
        readme.unlink()  # peft's model card names a local path; the C2S metadata says it all


@keep_random_state()
def apply_adapter(model: PreTrainedModel, path: Path, *, merge: bool):
    """Apply the adapter saved in `path` to its base `model`, for inference; `merge` folds it into the weights.

    peft draws the adapter's initial weights from torch's global generator before it reads the saved ones; the
    caller's random state is given back after.
    """
    with _peft_warnings():
        adapted = peft().PeftModel.from_pretrained(model, path, is_trainable=False)
    return adapted.merge_and_unload() if merge else adapted
