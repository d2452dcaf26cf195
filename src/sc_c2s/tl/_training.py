"""Training samples and the training loop behind :func:`sc_c2s.tl.finetune`.

A sample is ``prompt + answer + EOS`` in the format of :mod:`sc_c2s.prompts`. The loss covers the answer and
the EOS token only. Samples longer than the model's context lose genes from the end of their cell sentence
(its least expressed genes), with ``{num_genes}`` in the prompt following suit, so the answer is never cut.

The loop is plain PyTorch rather than the Hugging Face ``Trainer``: the models are often tiny and samples are
already tokenised, so a loop with length-bucketed batches, bf16 autocast on GPU and a tqdm bar is short, fast and
needs no extra dependency (the ``Trainer`` requires ``accelerate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sc_c2s import prompts

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def texts(task: str, words: Sequence[str], label: str, *, organism: str, upper: bool) -> tuple[str, str]:
    """Prompt and answer of one training sample of `task` for a cell with ranked genes `words`."""
    if task == "cell_type_prediction":
        return prompts.cell_type_prediction(words, organism=organism, upper=upper), prompts.answer(label)
    if task == "cell_type_generation":
        prompt = prompts.cell_type_generation(label, n_genes=len(words), organism=organism)
        return prompt, prompts.answer(prompts.cell_sentence(words, upper=upper))
    msg = f"Unknown task {task!r}."
    raise ValueError(msg)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    words: Sequence[Sequence[str]],
    labels: Sequence[str],
    *,
    tasks: Sequence[str],
    organism: str,
    upper: bool,
    max_length: int,
    gene_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Samples:
    """Tokenise one sample per cell and task, cells first: ``[cell 0 task 0, cell 0 task 1, cell 1 task 0, …]``.

    The prompt is tokenised with the tokenizer's special tokens (a BOS where the model uses one), the answer
    without, and EOS follows the answer. With `gene_dropout`, each gene of a cell-type prediction sample's
    sentence is left out with that probability (drawn from `rng`; at least one gene stays), the order of the
    others kept; generation samples keep their whole sentence.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        msg = "The tokenizer has no EOS token, so a trained model could not say where its answer ends."
        raise ValueError(msg)
    jobs = [
        (task, _drop(cell_words, gene_dropout, rng) if task == "cell_type_prediction" else cell_words, label)
        for cell_words, label in zip(words, labels, strict=True)
        for task in tasks
    ]
    pairs = [texts(task, w, label, organism=organism, upper=upper) for task, w, label in jobs]
    ids = _tokenize(tokenizer, pairs, eos)
    n_truncated = 0
    for i, (prompt_ids, answer_ids) in enumerate(ids):
        if len(prompt_ids) + len(answer_ids) > max_length:
            ids[i] = _truncate(tokenizer, *jobs[i], organism=organism, upper=upper, max_length=max_length, eos=eos)
            n_truncated += 1
    return Samples(
        input_ids=[np.asarray(p + a, dtype=np.int64) for p, a in ids],
        n_prompt=np.array([len(p) for p, _ in ids], dtype=np.int64),
        n_truncated=n_truncated,
    )


def _drop(words: Sequence[str], rate: float, rng: np.random.Generator | None) -> Sequence[str]:
    """`words` without a random share `rate` of them, in order; at least one stays."""
    if not rate or len(words) < 2:
        return words
    keep = rng.random(len(words)) >= rate
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep, strict=True) if k]


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], eos: int
) -> list[tuple[list[int], list[int]]]:
    """Prompt ids and answer ids (EOS appended) of each ``(prompt, answer)`` pair."""
    if not pairs:
        return []
    prompt_ids = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    return [(p, [*a, eos]) for p, a in zip(prompt_ids, answer_ids, strict=True)]


def _truncate(
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    words: Sequence[str],
    label: str,
    *,
    organism: str,
    upper: bool,
    max_length: int,
    eos: int,
) -> tuple[list[int], list[int]]:
    """Tokenise the sample with the most leading genes of `words` that fits into `max_length` tokens."""
    spaced = [" " + prompts.cell_sentence([w], upper=upper) for w in words]
    per_word = [len(ids) for ids in tokenizer(spaced, add_special_tokens=False)["input_ids"]]
    n_words = len(words)
    while True:
        (prompt_ids, answer_ids), *_ = _tokenize(
            tokenizer, [texts(task, words[:n_words], label, organism=organism, upper=upper)], eos
        )
        excess = len(prompt_ids) + len(answer_ids) - max_length
        if excess <= 0:
            return prompt_ids, answer_ids
        if n_words == 0:
            msg = (
                f"A {task} sample for label {label!r} needs {max_length + excess} tokens without any gene, more than "
                f"the model's context of {max_length}."
            )
            raise ValueError(msg)
        # drop the fewest trailing words that cover the excess, then check again
        dropped = np.searchsorted(np.cumsum(per_word[:n_words][::-1]), excess) + 1
        n_words = max(n_words - int(dropped), 0)


def collate(samples: Samples, index: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch the samples at `index`, padded on the left as at inference, with the loss mask in ``labels``.

    Position ids count from each sample's first token, so padding changes nothing.
    """
    import torch

    width = max(len(samples.input_ids[i]) for i in index)
    input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    labels = torch.full((len(index), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        n = len(samples.input_ids[i])
        input_ids[row, width - n :] = torch.from_numpy(samples.input_ids[i])
        labels[row, width - n :] = torch.from_numpy(samples.labels(i))
        attention_mask[row, width - n :] = 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
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
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=n_keep,
    ).logits[:, :-1]
    targets = labels[:, labels.shape[1] - n_keep + 1 :]
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    is_target = targets != IGNORE_INDEX
    return (token_loss.sum(1) / is_target.sum(1)).mean()


def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
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
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
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
    with tqdm(total=total, desc="fine-tuning", unit="step") as bar:
        for epoch in range(epochs):
            epoch_loss = 0.0
            if resample is not None:
                samples = resample(rng)
            lengths = np.array([len(ids) for ids in samples.input_ids])
            for index in batches(lengths, batch_size, rng):
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
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
