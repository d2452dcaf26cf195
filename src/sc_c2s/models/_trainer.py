"""The training loop behind :func:`sc_c2s.tl.finetune`: batches of tokenised samples, the loss, the optimiser.

A sample is ``prompt + answer + EOS``, tokenised; the loss covers the answer and the EOS token only. The loop is
plain PyTorch rather than the Hugging Face ``Trainer``: the models are often tiny and samples are already
tokenised, so a loop with length-bucketed batches, bf16 autocast on GPU and a progress bar is short, fast and
needs no extra dependency (the ``Trainer`` requires ``accelerate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sc_c2s._utils._progress import progress

from . import _runtime

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: Label value that the loss ignores (PyTorch's default ``ignore_index``).
IGNORE_INDEX = -100
#: Batches sorted by length together, so that few pad tokens are computed.
_BUCKET_BATCHES = 50
#: Share of the optimiser steps spent warming the learning rate up.
_WARMUP = 0.05


@dataclass
class Samples:
    """Tokenised training samples."""

    input_ids: list[np.ndarray]
    """Token ids of each sample: prompt, answer, EOS."""
    n_prompt: np.ndarray
    """Number of prompt tokens at the start of each sample; the loss ignores them."""
    n_truncated: int = 0
    """Samples whose cell sentence was shortened to fit the model's context."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def labels(self, i: int) -> np.ndarray:
        """Targets of sample `i`: its token ids with the prompt masked by :data:`IGNORE_INDEX`."""
        labels = self.input_ids[i].copy()
        labels[: self.n_prompt[i]] = IGNORE_INDEX
        return labels


def collate(samples: Samples, index: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch the samples at `index`, padded on the left as at inference, with the loss mask in ``labels``."""
    input_ids, attention_mask, position_ids = _runtime.left_pad([samples.input_ids[i] for i in index], pad_id=pad_id)
    labels = _runtime.pad_left([samples.labels(i) for i in index], fill=IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer tokens of a :func:`collate` batch: the mean over samples of their token mean.

    Averaging per sample first gives every sample the same weight, so the few tokens of a cell type are not
    drowned by the hundreds of tokens of generated sentences when both tasks share a batch.

    The answers sit at the end of the left-padded rows, so logits are computed for the last positions only
    (``logits_to_keep``): with a large vocabulary the output layer would otherwise cost most of the step.
    """
    import torch

    labels = batch["labels"]
    is_target = labels != IGNORE_INDEX
    # the earliest target of any row, counted from the end; the logit before it predicts it
    n_keep = int((labels.shape[1] - is_target.int().argmax(1)).max()) + 1
    logits, _ = _runtime.forward(
        model,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=n_keep,
    )
    targets = labels[:, labels.shape[1] - n_keep + 1 :]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    is_target = targets != IGNORE_INDEX
    return (token_loss.sum(1) / is_target.sum(1)).mean()


def shuffled_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of sample indices; samples of similar length share a batch, to spare padding."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * _BUCKET_BATCHES
    out = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def train(
    model: PreTrainedModel,
    samples: Samples,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    pad_id: int,
    random_state: int = 0,
    weight_decay: float = 0.01,
    resample: Callable[[np.random.Generator], Samples] | None = None,
) -> list[float]:
    """Train `model` in place with AdamW, linear warm-up and cosine decay; return the mean sample loss per epoch.

    `resample`, if given, makes each epoch's samples in place of `samples` (as many, in the same order), from
    the loop's seeded generator: augmented data drawn anew every epoch. On CUDA the forward pass runs in bf16
    autocast over float32 weights.
    """
    import torch

    device = _runtime.model_device(model)
    torch.manual_seed(random_state)
    rng = np.random.default_rng(random_state)
    steps_per_epoch = math.ceil(len(samples) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(_WARMUP * total))
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, weight_decay), lr=learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    history = []
    with progress(total=total, desc="fine-tuning", unit="step") as bar:
        for epoch in range(epochs):
            epoch_loss = 0.0
            if resample is not None:
                samples = resample(rng)
            lengths = np.array([len(ids) for ids in samples.input_ids])
            for index in shuffled_batches(lengths, batch_size, rng):
                batch = {k: v.to(device) for k, v in collate(samples, index, pad_id).items()}
                with autocast:
                    batch_loss = loss(model, batch)
                batch_loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                epoch_loss += batch_loss.item() * len(index)
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{batch_loss.item():.3f}")
            history.append(epoch_loss / len(samples))
    model.eval()
    return history


def _parameter_groups(model: PreTrainedModel, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on biases, norms and embeddings' bias-like vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    done = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * done))
