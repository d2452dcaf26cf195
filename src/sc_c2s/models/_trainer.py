"""The training loop behind :func:`sc_c2s.tl.finetune`: batches of tokenised samples, the loss, the optimiser.

A sample is ``prompt + answer + EOS``, tokenised; the loss covers the answer and the EOS token only. The loop is
plain PyTorch rather than the Hugging Face ``Trainer``: the models are often tiny and samples are already
tokenised, so a loop with length-bucketed batches, bf16 autocast on GPU and a progress bar is short, fast and
needs no extra dependency (the ``Trainer`` requires ``accelerate``).

Model selection: at regular intervals the loop scores held-out samples of each task under every candidate label
(the cell type asked for, or answered) and counts how often the true label gives the lowest answer loss. It keeps a
copy of the trained weights with the best mean of these label accuracies over tasks (the latest among equals),
stops after `patience` evaluations below the best, and puts the best weights back at the end. The answer loss is
recorded too but does not select: for generation it rises while the model learns what sets the cell types apart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sc_c2s._compat import fused_adamw
from sc_c2s._utils._progress import progress

from . import _candidates, _runtime
from ._dropout import cpu_dropout

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: Label value that the loss ignores (PyTorch's default ``ignore_index``).
IGNORE_INDEX = -100
#: Batches sorted by length together, so that few pad tokens are computed.
_BUCKET_BATCHES = 50
#: Share of the optimiser steps spent warming the learning rate up.
_WARMUP = 0.05
#: AdamW's weight decay, on the weight matrices (embeddings included), not on biases and norms.
_WEIGHT_DECAY = 0.01
#: Held-out samples per task scored at each evaluation: cells × labels where each label makes its own sample
#: (:class:`Choices`), cells where one prompt is read for all labels (:class:`Answers`); :func:`sc_c2s.tl.finetune`
#: draws that many from larger held-out sets.
EVAL_SAMPLES = 800
#: Evaluations over a run that reaches its maximum number of steps, when the interval is not given.
N_EVALUATIONS = 20
#: Default budget from scratch, in optimiser steps whatever the number of samples.
SCRATCH_STEPS = 2400
#: Default budget of a pretrained model: passes over the samples.
PRETRAINED_EPOCHS = 3
#: Architectures (``model_type``) whose logits are their output layer applied to the last hidden states, with no
#: scaling or soft-capping after it (Gemma 2 caps its logits).
_PLAIN_OUTPUT = frozenset({"gpt_neox"})


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
    labels = _runtime.stack_right_aligned([samples.labels(i) for i in index], fill=IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


@dataclass
class Choices:
    """Held-out samples of one task written with every candidate label, to score which label fits each cell best."""

    samples: list[Samples]
    """The same cells' samples, once per candidate label (in the prompt for generation, as answer for prediction)."""
    truth: np.ndarray
    """Index into `samples` of each cell's true label."""


@dataclass
class Answers:
    """Held-out prompts whose answer is a label, to score every candidate label after each prompt read once."""

    prompts: list[np.ndarray]
    """Token ids of each cell's prompt."""
    answers: list[list[int]]
    """Token ids of each candidate label's answer, as constrained annotation scores them (no EOS)."""
    truth: np.ndarray
    """Index into `answers` of each cell's true label."""


@dataclass
class Result:
    """What :func:`train` did."""

    loss: list[float]
    """Mean training sample loss of each epoch (the last one possibly partial)."""
    steps: int
    """Optimiser steps taken."""
    stopped: str
    """Why training ended: ``"max_steps"``, ``"patience"`` or ``"max_time"``."""
    curve: list[dict] = field(default_factory=list)
    """One entry per evaluation: ``step``, ``seconds`` since the start, held-out ``loss`` and label ``accuracy`` per
    task, and the ``score`` (mean accuracy) that selects."""
    best_step: int | None = None
    """Step of the weights kept (the best score, the latest among equals), ``None`` without held-out samples."""
    n_tokens: int = 0
    """Tokens of the samples trained on (prompts and answers, no padding)."""


def loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer tokens of a :func:`collate` batch: the mean over samples of their token mean.

    Averaging per sample first gives every sample the same weight, so the few tokens of a cell type are not
    drowned by the hundreds of tokens of generated sentences when both tasks share a batch. A model whose logits
    are its output layer applied to the last hidden states (:data:`_PLAIN_OUTPUT`), trained in float32 on the CPU,
    computes the output layer and the loss as one step (:mod:`._output_loss`).
    """
    import torch

    head = model.get_output_embeddings()
    if not (
        model.config.model_type in _PLAIN_OUTPUT
        and type(head) is torch.nn.Linear
        and head.bias is None
        and head.weight.dtype == torch.float32
        and head.weight.device.type == "cpu"  # on CUDA the forward pass runs in autocast
    ):
        return sample_loss(model, batch).mean()
    from ._output_loss import linear_cross_entropy

    n_keep, targets = _answer_targets(batch["labels"])
    hidden = _runtime.last_hidden_state(
        model, batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    )[:, -n_keep:]
    is_target = targets != IGNORE_INDEX
    token_weights = is_target / is_target.sum(1, keepdim=True) / len(targets)
    return linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), token_weights.reshape(-1)
    )


def sample_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of each sample of a :func:`collate` batch.

    The answers sit at the end of the left-padded rows, so logits are computed for the last positions only
    (``logits_to_keep``): with a large vocabulary the output layer would otherwise cost most of the step.
    """
    import torch

    n_keep, targets = _answer_targets(batch["labels"])
    logits, _ = _runtime.forward(
        model,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=n_keep,
    )
    # the logits are read as rows of one position each, so that the softmax and its gradient run over contiguous
    # memory
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    is_target = targets != IGNORE_INDEX
    return token_loss.sum(1) / is_target.sum(1)


def answer_losses(
    model: PreTrainedModel, samples: Samples, *, batch_size: int | None, pad_id: int, desc: str | None = None
) -> np.ndarray:
    """Mean cross-entropy of each sample's answer tokens (:func:`sample_loss`), in evaluation mode, no gradients.

    Samples are batched by length as :func:`~sc_c2s.models._runtime.run_batches` batches prompts (`batch_size`
    ``None`` sizes batches to a GPU's free memory; `desc` names the progress bar, ``None`` hides it), and each batch
    is read in parts whose logits fit :data:`~sc_c2s.models._candidates.LOGIT_BUDGET`.
    """
    vocabulary = model.get_output_embeddings().out_features
    out = np.empty(len(samples))

    def score(batch: _runtime.Batch) -> None:
        labels = _runtime.stack_right_aligned([samples.labels(i) for i in batch.index], fill=IGNORE_INDEX)
        n_keep, _ = _answer_targets(labels)
        rows = max(1, _candidates.LOGIT_BUDGET // (n_keep * vocabulary))
        for begin in range(0, len(batch.index), rows):
            part = slice(begin, begin + rows)
            inputs = {
                "input_ids": batch.input_ids[part],
                "attention_mask": batch.attention_mask[part],
                "position_ids": batch.position_ids[part],
                "labels": labels[part].to(batch.input_ids.device),
            }
            out[batch.index[part]] = sample_loss(model, inputs).float().cpu().numpy()

    with _runtime.inference(model):
        _runtime.run_batches(
            model, samples.input_ids, score, batch_size=batch_size, pad_id=pad_id, desc=desc, unit="sample"
        )
    return out


def _answer_targets(labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many last positions predict an answer token, and the token each of them predicts.

    The earliest answer token of any row, counted from the end, sets the number; the position before it predicts
    it. The last position predicts nothing: it gets an ignored target rather than being sliced off.
    """
    import torch

    is_target = labels != IGNORE_INDEX
    n_keep = int((labels.shape[1] - is_target.int().argmax(1)).max()) + 1
    return n_keep, torch.nn.functional.pad(labels[:, labels.shape[1] - n_keep + 1 :], (0, 1), value=IGNORE_INDEX)


def budget(
    n_samples: int, batch_size: int, *, epochs: int | None = None, max_steps: int | None = None, scratch: bool = True
) -> int:
    """Maximum optimiser steps: the smaller of `epochs` passes over the samples and `max_steps`.

    When neither is given: from scratch :data:`SCRATCH_STEPS` (what generation needs on a few hundred cells,
    and about 9 minutes on 2 CPU cores; held-out selection stops earlier once the scores plateau), for a
    pretrained model :data:`PRETRAINED_EPOCHS` passes.
    """
    per_epoch = math.ceil(n_samples / batch_size)
    if epochs is None and max_steps is None:
        return SCRATCH_STEPS if scratch else PRETRAINED_EPOCHS * per_epoch
    return min(n for n in (None if epochs is None else epochs * per_epoch, max_steps) if n is not None)


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


@_runtime.keep_random_state()
def train(
    model: PreTrainedModel,
    samples: Samples,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    pad_id: int,
    random_state: int = 0,
    resample: Callable[[np.random.Generator], Samples] | None = None,
    held_out: Mapping[str, Choices | Answers] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    max_time: float | None = None,
) -> Result:
    """Train `model` in place with AdamW, linear warm-up and cosine decay over `max_steps` optimiser steps.

    Batches are drawn epoch after epoch until `max_steps`. `resample`, if given, makes each epoch's samples in
    place of `samples` (as many, in the same order), from the loop's seeded generator: augmented data drawn anew
    every epoch. On CUDA the forward pass runs in bf16 autocast over float32 weights; on the CPU dropout draws its
    masks with :func:`~sc_c2s.models._dropout.keep_mask`.

    With `held_out` samples (by task, under every candidate label), each task's label accuracy (the share of
    cells whose true label fits best: the lowest answer loss of :class:`Choices`, the highest log-likelihood of
    :class:`Answers`) and answer loss are computed every `eval_every` steps
    (``None``: :data:`N_EVALUATIONS` times over `max_steps`) and at the last step; the weights with the highest mean
    accuracy over tasks (the latest among equals) are kept in memory and restored at the end. Training stops early
    after `patience` evaluations in a row below the best (``None``: never). `max_time` (seconds) stops training
    after the step that exceeds it. Torch's global generator (CPU dropout) is seeded with `random_state` for the run
    and given back as it was after.
    """
    import torch

    device = _runtime.model_device(model)
    _runtime.seed_torch(random_state, device)
    rng = np.random.default_rng(random_state)
    warmup = max(1, int(_WARMUP * max_steps))
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, _WEIGHT_DECAY), lr=learning_rate, betas=(0.9, 0.95), fused=fused_adamw(device)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, max_steps))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    selection = _Selection(model, held_out, batch_size=batch_size, pad_id=pad_id)
    if eval_every is None:
        eval_every = max(1, math.ceil(max_steps / N_EVALUATIONS))
    start = time.perf_counter()
    step, stopped, history, n_tokens = 0, "max_steps", [], 0
    model.train()
    with progress(total=max_steps, desc="fine-tuning", unit="step") as bar, cpu_dropout(model):
        while step < max_steps and stopped == "max_steps":
            epoch_loss, n_seen = 0.0, 0
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
                step += 1
                n_tokens += int(lengths[index].sum())
                epoch_loss += batch_loss.item() * len(index)
                n_seen += len(index)
                elapsed = time.perf_counter() - start
                if max_time is not None and elapsed >= max_time:
                    stopped = "max_time"
                if selection and (step % eval_every == 0 or step == max_steps or stopped != "max_steps"):
                    with autocast:
                        selection.evaluate(step, start)
                    if patience is not None and selection.since_best >= patience:
                        stopped = "patience"
                bar.update()
                left = (max_steps - step) * elapsed / step
                if max_time is not None:
                    left = min(left, max(max_time - elapsed, 0.0))
                bar.set_postfix(
                    loss=f"{batch_loss.item():.3f}",
                    **selection.postfix(),
                    left=time.strftime("%M:%S" if left < 3600 else "%H:%M:%S", time.gmtime(left)),
                )
                if step == max_steps or stopped != "max_steps":
                    break
            history.append(epoch_loss / n_seen)
    selection.restore()
    model.eval()
    return Result(
        loss=history,
        steps=step,
        stopped=stopped,
        curve=selection.curve,
        best_step=selection.best_step,
        n_tokens=n_tokens,
    )


class _Selection:
    """Held-out label accuracy and loss per task at each evaluation, and a copy of the best weights (on the CPU)."""

    def __init__(
        self,
        model: PreTrainedModel,
        held_out: Mapping[str, Choices | Answers] | None,
        *,
        batch_size: int,
        pad_id: int,
    ) -> None:
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size
        self.held_out = {task: choices for task, choices in (held_out or {}).items() if len(choices.truth)}
        self.curve: list[dict] = []
        self.best_step: int | None = None
        self.best_score = -math.inf
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.since_best = 0

    def __bool__(self) -> bool:
        return bool(self.held_out)

    def evaluate(self, step: int, start: float) -> None:
        """Score the held-out samples; keep the weights if they score at least as well as the best so far."""
        self.model.eval()
        losses, accuracies = {}, {}
        for task, choices in self.held_out.items():
            true_loss, best = self._scores(choices)
            losses[task] = float(true_loss.mean())
            accuracies[task] = float(np.mean(best == choices.truth))
        self.model.train()
        # rounded: the same cells right, split otherwise between the tasks, average an ulp apart
        score = round(float(np.mean(list(accuracies.values()))), 12)
        self.curve.append(
            {
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": {k: round(v, 5) for k, v in losses.items()},
                "accuracy": {k: round(v, 5) for k, v in accuracies.items()},
                "score": round(score, 5),
            }
        )
        if score >= self.best_score:
            self.best_score, self.best_step, self.since_best = score, step, 0
            self.best_weights = {
                name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters() if p.requires_grad
            }
        else:
            self.since_best += 1

    def _scores(self, choices: Choices | Answers) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's answer loss (mean over tokens) under its true label, and the label that fits it best.

        :class:`Choices`: the label whose sample has the lowest answer loss; :class:`Answers`: the label with the
        highest summed log-likelihood, as constrained annotation chooses.
        """
        cells = np.arange(len(choices.truth))
        if isinstance(choices, Answers):
            loglik = _candidates.score_answers(
                self.model, choices.prompts, choices.answers, batch_size=self.batch_size, pad_id=self.pad_id, desc=None
            )
            n_tokens = np.array([len(ids) for ids in choices.answers])
            return -loglik[cells, choices.truth] / n_tokens[choices.truth], loglik.argmax(1)
        table = np.stack(
            [
                answer_losses(self.model, samples, batch_size=self.batch_size, pad_id=self.pad_id)
                for samples in choices.samples
            ]
        )  # labels × cells
        return table[choices.truth, cells], table.argmin(0)

    def postfix(self) -> dict[str, str]:
        """Progress-bar fields: the latest held-out label accuracy and the best one."""
        if not self.curve:
            return {}
        return {"held_out": f"{self.curve[-1]['score']:.3f}", "best": f"{self.best_score:.3f}"}

    def restore(self) -> None:
        """Put the best weights back into the model."""
        import torch

        if self.best_weights is None:
            return
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, weights in self.best_weights.items():
                parameters[name].copy_(weights)


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
