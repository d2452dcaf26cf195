"""Training samples of :func:`sc_c2s.tl.finetune`: the prompt and answer of each task, tokenised.

A sample is ``prompt + answer + EOS`` in the format of :mod:`sc_c2s.prompts`. Single-cell and perturbation samples
longer than the model's context are refused; multi-cell samples lose genes from the end of each cell's sentence (its
least expressed genes), with ``{num_genes}`` in the prompt following suit, so the answer is never cut. Single-cell
samples come one per cell and task; multi-cell samples (tissue prediction, tissue-conditioned generation, summary)
are groups of cells of the same tissue and group, drawn anew every epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sc_c2s import prompts
from sc_c2s._utils._validate import check_obs_column
from sc_c2s.models import _runtime
from sc_c2s.models._trainer import Samples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def texts(
    task: str, words: Sequence[str], label: str, *, organism: str, upper: bool, n_genes: int | None = None
) -> tuple[str, str]:
    """Prompt and answer of one training sample of `task` for a cell with ranked genes `words`.

    A cell-type prediction prompt asks about `n_genes` genes, as at inference (``None``: ``len(words)``). A
    generation prompt asks for as many genes as the cell's sentence holds, a departure from the published format
    chosen on validation cells (see the method page, "Prompts").
    """
    if task == "cell_type_prediction":
        prompt = prompts.cell_type_prediction(words, n_genes=n_genes, organism=organism, upper=upper)
        return prompt, prompts.answer(label)
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
    n_genes: int | None = None,
    gene_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
    what: str = "training",
) -> Samples:
    """Tokenise one sample per cell and task, cells first: ``[cell 0 task 0, cell 0 task 1, cell 1 task 0, …]``.

    The prompt is tokenised with the tokenizer's special tokens (a BOS where the model uses one), the answer
    without, and EOS follows the answer. Cell-type prediction prompts ask about `n_genes` genes (see
    :func:`texts`). With `gene_dropout`, each gene of a cell-type prediction sample's sentence is left out with that
    probability (drawn from `rng`; at least one gene stays), the order of the others kept; generation samples keep
    their whole sentence. Samples longer than `max_length` tokens are refused, naming the most genes that fit:
    annotation and generation with sentences of `n_genes` genes would not fit in the model's context either. `what`
    names the samples in the message (``"training"``, ``"held-out"``).
    """
    eos = _runtime.eos_id(tokenizer)
    jobs = [
        (task, _drop(cell_words, gene_dropout, rng) if task == "cell_type_prediction" else cell_words, label)
        for cell_words, label in zip(words, labels, strict=True)
        for task in tasks
    ]
    pairs = [texts(task, w, label, organism=organism, upper=upper, n_genes=n_genes) for task, w, label in jobs]
    ids = _tokenize(tokenizer, pairs, eos)
    lengths = np.array([len(p) + len(a) for p, a in ids], dtype=np.int64)
    if len(lengths) and lengths.max() > max_length:
        longest = int(lengths.argmax())
        task = jobs[longest][0]
        fit = _genes_that_fit(tokenizer, *jobs[longest], organism=organism, upper=upper, max_length=max_length, eos=eos)
        msg = (
            f"{_samples_are(int((lengths > max_length).sum()), what)} longer than the {max_length} tokens the model "
            f"reads (the longest, a {task} sample, has {lengths[longest]}); ask for at most `n_genes={fit}`."
        )
        raise ValueError(msg)
    return Samples(
        input_ids=[np.asarray(p + a, dtype=np.int64) for p, a in ids],
        n_prompt=np.array([len(p) for p, _ in ids], dtype=np.int64),
    )


def balanced(labels: Sequence[str], *, balance: float, rng: np.random.Generator) -> np.ndarray:
    """Draw as many cells as `labels` holds, rare labels more often than their share; return their indices.

    A label of ``n`` cells gets a share of the draw proportional to ``n ** (1 - balance)``: ``0`` keeps the data's
    proportions, ``1`` gives every label the same share, ``0.5`` the square root of its size. Each label's cells
    are taken in a random order, cycled as often as its share needs, so that its cells come equally often.
    """
    codes, sizes = np.unique(np.asarray(labels, dtype=object), return_inverse=True, return_counts=True)[1:]
    weights = sizes ** (1.0 - balance)
    expected = len(codes) * weights / weights.sum()
    quota = np.floor(expected).astype(int)
    # the draw's remainder goes to the labels with the largest fractional parts
    quota[np.argsort(quota - expected, kind="stable")[: len(codes) - quota.sum()]] += 1
    picked = []
    for label, n in enumerate(quota):
        cells = np.flatnonzero(codes == label)
        cycled = np.concatenate([rng.permutation(cells) for _ in range(-(-n // len(cells)))]) if n else cells
        picked.append(cycled[:n])
    return np.sort(np.concatenate(picked))


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
    prompt_ids = _runtime.tokenize(tokenizer, [p for p, _ in pairs])
    answer_ids = _runtime.tokenize(tokenizer, [a for _, a in pairs], special_tokens=False)
    return [(p, [*a, eos]) for p, a in zip(prompt_ids, answer_ids, strict=True)]


def _samples_are(n: int, what: str) -> str:
    """``"1 training sample is"``, ``"2 training samples are"``."""
    return f"{n} {what} sample is" if n == 1 else f"{n} {what} samples are"


def _genes_that_fit(
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    words: Sequence[str],
    label: str,
    *,
    organism: str,
    upper: bool,
    max_length: int,
    eos: int,
) -> int:
    """Return the most leading genes of `words` whose sample fits into `max_length` tokens."""
    spaced = [" " + prompts.cell_sentence([w], upper=upper) for w in words]
    per_word = [len(ids) for ids in _runtime.tokenize(tokenizer, spaced, special_tokens=False)]
    n_words = len(words)
    while True:
        (prompt_ids, answer_ids), *_ = _tokenize(
            tokenizer, [texts(task, words[:n_words], label, organism=organism, upper=upper)], eos
        )
        excess = len(prompt_ids) + len(answer_ids) - max_length
        if excess <= 0:
            return n_words
        if n_words == 0:
            msg = (
                f"A {task} sample for label {label!r} needs {max_length + excess} tokens without any gene, more than "
                f"the model's context of {max_length}."
            )
            raise ValueError(msg)
        # drop the fewest trailing words that cover the excess, then check again
        dropped = np.searchsorted(np.cumsum(per_word[:n_words][::-1]), excess) + 1
        n_words = max(n_words - int(dropped), 0)


@dataclass
class MultiCell:
    """How multi-cell samples are drawn: the cells' genes, tissue, group and summary, and the tasks."""

    words: Sequence[Sequence[str]]
    """Ranked genes of each cell."""
    units: np.ndarray
    """Code of each cell's unit (same tissue and group); ``-1``: never drawn."""
    tissues: Sequence[str]
    """Tissue of each unit."""
    summaries: Sequence[str | None]
    """Summary of each unit (``None``: none, no summary sample)."""
    tasks: tuple[str, ...]
    n_cells: tuple[int, int]
    """Fewest and most cells per sample."""
    n_genes: int
    """Genes asked for per cell."""
    paraphrase: bool = False
    """Whether summary samples draw their instruction among the published one and its paraphrases."""

    def draws(self, rng: np.random.Generator) -> list[tuple[str, int, np.ndarray]]:
        """``(task, unit, cells)`` of each sample of an epoch.

        Each unit gives ``ceil(n / mean sample size)`` samples per task (so each cell is read about once per task
        and epoch), each of a random number of its cells in `n_cells` (at most all of them), in random order.
        """
        low, high = self.n_cells
        out = []
        for unit in range(len(self.tissues)):
            cells = np.flatnonzero(self.units == unit)
            if not len(cells):
                continue
            n_samples = math.ceil(len(cells) / ((low + high) / 2))
            for task in self.tasks:
                if task == "summary" and self.summaries[unit] is None:
                    continue
                for _ in range(n_samples):
                    size = min(int(rng.integers(low, high + 1)), len(cells))
                    out.append((task, unit, rng.choice(cells, size=size, replace=False)))
        return out


def multi_cell_texts(
    task: str,
    cells: Sequence[Sequence[str]],
    answer: str,
    *,
    n_genes: int,
    organism: str,
    upper: bool,
    template: str = prompts.SUMMARY,
) -> tuple[str, str]:
    """Prompt and answer of a multi-cell sample of `task`: `answer` is the tissue or the summary.

    `template` is the instruction of a summary sample.
    """
    if task == "tissue_prediction":
        return prompts.tissue_prediction(cells, n_genes=n_genes, organism=organism, upper=upper), prompts.answer(answer)
    if task == "tissue_generation":
        prompt = prompts.tissue_generation(answer, n_cells=len(cells), n_genes=n_genes, organism=organism)
        return prompt, prompts.answer(prompts.multi_cell_sentences(cells, upper=upper))
    if task == "summary":
        prompt = prompts.summary(cells, n_genes=n_genes, organism=organism, upper=upper, template=template)
        return prompt, prompts.answer(answer)
    msg = f"Unknown task {task!r}."
    raise ValueError(msg)


def encode_multi_cell(
    tokenizer: PreTrainedTokenizerBase,
    spec: MultiCell,
    *,
    organism: str,
    upper: bool,
    max_length: int,
    rng: np.random.Generator,
) -> Samples:
    """Draw and tokenise one epoch of multi-cell samples (see :meth:`MultiCell.draws`).

    A sample longer than `max_length` tokens keeps fewer genes of every cell (the least expressed go), the
    answer whole.
    """
    eos = _runtime.eos_id(tokenizer)
    draws = spec.draws(rng)
    templates = (prompts.SUMMARY, *prompts.SUMMARY_PARAPHRASES) if spec.paraphrase else (prompts.SUMMARY,)
    chosen = rng.integers(len(templates), size=len(draws))

    def pairs(i: int, n_words: int) -> tuple[str, str]:
        task, unit, cells = draws[i]
        answer = spec.summaries[unit] if task == "summary" else spec.tissues[unit]
        words = [spec.words[c][:n_words] for c in cells]
        return multi_cell_texts(
            task, words, answer, n_genes=spec.n_genes, organism=organism, upper=upper, template=templates[chosen[i]]
        )

    ids = _tokenize(tokenizer, [pairs(i, spec.n_genes) for i in range(len(draws))], eos)
    n_truncated = 0
    for i, draw in enumerate(draws):
        n_words = spec.n_genes
        while len(ids[i][0]) + len(ids[i][1]) > max_length:
            if n_words == 0:
                msg = f"A {draw[0]} sample of {len(draw[2])} cells does not fit the model's context of {max_length}."
                raise ValueError(msg)
            n_words = int(n_words * max_length / (len(ids[i][0]) + len(ids[i][1])))
            ids[i] = _tokenize(tokenizer, [pairs(i, n_words)], eos)[0]
        n_truncated += n_words < spec.n_genes
    return Samples(
        input_ids=[np.asarray(p + a, dtype=np.int64) for p, a in ids],
        n_prompt=np.array([len(p) for p, _ in ids], dtype=np.int64),
        n_truncated=n_truncated,
    )


def encode_perturbation(
    tokenizer: PreTrainedTokenizerBase,
    control_words: Sequence[Sequence[str]],
    perturbed_words: Sequence[Sequence[str]],
    perturbations: Sequence[str],
    *,
    n_genes: int,
    upper: bool,
    max_length: int,
) -> Samples:
    """Tokenise one perturbation sample per pair: a control cell's sentence prompts, a perturbed cell's answers.

    The prompt asks about `n_genes` genes, as at inference. Samples longer than `max_length` tokens are refused:
    :func:`sc_c2s.tl.predict_perturbation` with sentences of `n_genes` genes would not fit in the model's context
    either (:func:`sc_c2s.tl.finetune` checks that first, naming the most genes that fit).
    """
    eos = _runtime.eos_id(tokenizer)
    jobs = list(zip(control_words, perturbed_words, perturbations, strict=True))
    ids = _tokenize(tokenizer, [_perturbation_texts(*job, n_genes=n_genes, upper=upper) for job in jobs], eos)
    lengths = np.array([len(p) + len(a) for p, a in ids], dtype=np.int64)
    if len(lengths) and lengths.max() > max_length:
        msg = (
            f"{_samples_are(int((lengths > max_length).sum()), 'perturbation')} longer than the {max_length} tokens "
            f"the model reads (the longest has {lengths.max()}); lower `n_genes`."
        )
        raise ValueError(msg)
    return Samples(
        input_ids=[np.asarray(p + a, dtype=np.int64) for p, a in ids],
        n_prompt=np.array([len(p) for p, _ in ids], dtype=np.int64),
    )


def concat(*parts: Samples) -> Samples:
    """One set of samples from several, in order."""
    return Samples(
        input_ids=[ids for part in parts for ids in part.input_ids],
        n_prompt=np.concatenate([part.n_prompt for part in parts]),
        n_truncated=sum(part.n_truncated for part in parts),
    )


@dataclass
class Units:
    """The groups multi-cell samples are drawn from: cells of the same tissue and group (checked arguments)."""

    tasks: tuple[str, ...]
    """Multi-cell tasks asked for (none: no multi-cell sample)."""
    codes: np.ndarray
    """Unit of each cell of ``obs``."""
    tissues_of: list[str]
    """Tissue of each unit (``""`` without `tissue_key`)."""
    summaries: list[str | None]
    """Summary text of each unit."""
    n_cells: tuple[int, int]

    @property
    def tissues(self) -> list[str]:
        """The distinct tissues, sorted."""
        return sorted({t for t in self.tissues_of if t})

    def words(self) -> list[str]:
        """Texts the answers hold (tissues and summaries), for the vocabulary of a model trained from scratch."""
        return [*self.tissues, *(s for s in dict.fromkeys(self.summaries) if s)]

    def max_length(self, n_genes: int) -> int:
        """Tokens of the longest sample with a word-level tokenizer, with room to spare."""
        longest_summary = max((len(s.split()) for s in self.summaries if s), default=0)
        return self.n_cells[1] * (n_genes + 4) + 2 * longest_summary + 128

    def spec(
        self, words: Sequence[Sequence[str]], cells: np.ndarray, *, n_genes: int, paraphrase: bool = False
    ) -> MultiCell | None:
        """How to draw samples from the training `cells` (positions in ``obs``; `words` are theirs)."""
        if not self.tasks:
            return None
        return MultiCell(
            words=words,
            units=self.codes[cells],
            tissues=self.tissues_of,
            summaries=self.summaries,
            tasks=self.tasks,
            n_cells=self.n_cells,
            n_genes=n_genes,
            paraphrase=paraphrase,
        )


def units(
    obs: pd.DataFrame,
    *,
    tasks: tuple[str, ...],
    tissue_key: str | None,
    groupby: str | None,
    summaries: Mapping[Hashable, str] | str | None,
    n_cells: tuple[int, int],
) -> Units:
    """Check the multi-cell arguments of :func:`sc_c2s.tl.finetune` and group the cells into units.

    Tissues must be one line of text each (answers and prompts name them); without a multi-cell task only `n_cells`
    is checked, and no unit is made.
    """
    n_cells = _check_n_cells(n_cells)
    if not tasks:
        return Units((), np.full(len(obs), -1), [], [], n_cells)
    needs_tissue = [t for t in tasks if t != "summary"]
    if needs_tissue and tissue_key is None:
        msg = f"The tasks {needs_tissue} learn tissues: pass `tissue_key=` with the column of `obs` that holds them."
        raise ValueError(msg)
    columns = {}
    if tissue_key is not None:
        columns["tissue"] = text_column(obs, tissue_key, arg="tissue_key", what="tissue")
    if groupby is not None:
        columns["group"] = complete_column(obs, groupby, arg="groupby", what="group")
    if "summary" in tasks and (summaries is None or groupby is None):
        msg = "The summary task needs `groupby=` (the groups of cells) and `summaries=` (a text per group)."
        raise ValueError(msg)
    if not columns:
        msg = "Multi-cell tasks need `tissue_key=` or `groupby=` to know which cells belong together."
        raise ValueError(msg)
    keys = pd.DataFrame({k: v.astype(str) for k, v in columns.items()}, index=obs.index)
    name = keys.agg("\t".join, axis=1)
    codes, names = pd.factorize(name, sort=True)
    largest = int(np.bincount(codes).max())
    if n_cells[0] > largest:
        warnings.warn(
            f"`n_cells={n_cells}` asks for samples of at least {n_cells[0]} cells, but the largest group of cells (of "
            f"one tissue and group) has {largest}: each sample holds all the cells of its group. Pass `n_cells` "
            "within the groups' sizes, so that the model learns, and is later prompted with, samples as large as it "
            "will see.",
            UserWarning,
            stacklevel=3,
        )
    first = keys.groupby(name, sort=True).first()
    tissues_of = first["tissue"].tolist() if "tissue" in first else [""] * len(names)
    texts = _summaries(obs, groupby, first["group"] if "group" in first else None, summaries, n_units=len(first))
    return Units(tasks, codes, tissues_of, texts, n_cells)


def complete_column(obs: pd.DataFrame, key: str, *, arg: str, what: str) -> pd.Series:
    """Return the column ``obs[key]`` (passed as `arg`) of each cell's `what` (a label, a tissue), refusing gaps."""
    values = check_obs_column(obs, key, arg=arg)
    if values.isna().any():
        msg = (
            f"obs[{key!r}] has {int(values.isna().sum())} missing {what}s; drop those cells "
            f"(`adata[adata.obs[{key!r}].notna()].copy()`) or give them a {what}."
        )
        raise ValueError(msg)
    return values


#: what a label or tissue may be: one line, no space at either end (a model's answer is stripped of them)
ANSWER_TEXT = r"\S(?:[^\n\r]*\S)?"


def text_column(obs: pd.DataFrame, key: str, *, arg: str, what: str) -> pd.Series:
    """Return :func:`complete_column` as strings, refusing values a model could not write back (:data:`ANSWER_TEXT`)."""
    values = complete_column(obs, key, arg=arg, what=what).astype(str)
    bad = values[~values.str.fullmatch(ANSWER_TEXT)]
    if len(bad):
        msg = (
            f"obs[{key!r}] has {what}s that are empty, span several lines, or start or end with a space (e.g. "
            f"{bad.iloc[0]!r}); a model's answer is one line without them. Rename them, e.g. "
            f"`adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).str.strip()`."
        )
        raise ValueError(msg)
    return values


def _check_n_cells(n_cells: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(n_cells, Sequence)
        or len(n_cells) != 2
        or not all(isinstance(n, int | np.integer) and not isinstance(n, bool) for n in n_cells)
        or not 1 <= n_cells[0] <= n_cells[1]
    ):
        msg = f"`n_cells` must be (fewest, most) cells per multi-cell sample, e.g. (5, 20); got {n_cells!r}."
        raise ValueError(msg)
    return int(n_cells[0]), int(n_cells[1])


def _summaries(
    obs: pd.DataFrame,
    groupby: str | None,
    groups: pd.Series | None,
    summaries: Mapping[Hashable, str] | str | None,
    *,
    n_units: int,
) -> list[str | None]:
    """Return the summary of each unit's group (`groups`: as strings): from a mapping or an ``obs`` column.

    A mapping's keys are groups: values of ``obs[groupby]`` (``1`` of an integer column) or their strings (``"1"``),
    not both with different texts; keys that are no group are left out with a warning. A column must give the cells
    of a group one text (cells without one are passed over): a group whose cells hold different texts is refused.
    """
    if groups is None or summaries is None:
        return [None] * n_units
    if isinstance(summaries, str):
        summaries = _column_texts(obs, groupby, summaries)
    elif not isinstance(summaries, Mapping):
        msg = f"`summaries` must be a mapping of group to text or a column of `obs`, not {type(summaries).__name__}."
        raise TypeError(msg)
    values = obs[groupby].dropna().drop_duplicates()
    by_name, used = {}, set()
    for name, value in zip(values.astype(str), values, strict=True):
        keys = [key for key in dict.fromkeys((value, name)) if key in summaries]
        if len(keys) == 2 and _text_or_none(summaries[value]) != _text_or_none(summaries[name]):
            msg = (
                f"`summaries` holds two texts for the group {value!r} of obs[{groupby!r}], keyed {value!r} and "
                f"{name!r}; keep one of them."
            )
            raise ValueError(msg)
        if keys:
            by_name[name] = _text_or_none(summaries[keys[0]])
            used.update(keys)
    unknown = [key for key in summaries if key not in used]
    if unknown:
        warnings.warn(
            f"{len(unknown)} keys of `summaries` are no group of obs[{groupby!r}] and are left out (e.g. "
            f"{unknown[:3]!r}); key the texts by the column's values (e.g. {values.tolist()[:3]!r}).",
            UserWarning,
            stacklevel=4,
        )
    texts = [by_name.get(g) for g in groups.astype(str)]
    bad = [t for t in texts if t is not None and (not isinstance(t, str) or not t.strip())]
    if bad or all(t is None for t in texts):
        msg = (
            f"`summaries` must hold a non-empty text for at least one group of obs[{groupby!r}], keyed by the "
            f"column's values (e.g. {values.tolist()[:3]!r})."
        )
        raise ValueError(msg)
    return [None if t is None else _one_text(t) for t in texts]


def _column_texts(obs: pd.DataFrame, groupby: str, key: str) -> dict[Hashable, str]:
    """Text of each group of `groupby` from the ``obs`` column `key`, refusing groups whose cells differ."""
    column = check_obs_column(obs, key, arg="summaries").astype(object)
    texts = pd.DataFrame({"group": obs[groupby], "text": column.where(column.map(lambda t: isinstance(t, str)))})
    texts = texts.dropna().assign(same=lambda df: df["text"].map(_one_text))
    by_group = texts.groupby("group", observed=True, sort=False)
    n_texts = by_group["same"].nunique()
    if (n_texts > 1).any():
        group = n_texts.index[n_texts > 1][0]
        msg = (
            f"obs[{key!r}] holds different texts for the cells of {int((n_texts > 1).sum())} groups of "
            f"obs[{groupby!r}] (e.g. {group!r}: {by_group.get_group(group)['text'].unique()[:2].tolist()!r}); give "
            "the cells of a group one text, or pass a mapping of group to text."
        )
        raise ValueError(msg)
    return by_group["text"].first().to_dict()


def _text_or_none(text: object) -> object:
    """`text`, or ``None`` for a missing one (NaN, as ``df.set_index(group)[column].to_dict()`` gives it)."""
    return None if pd.api.types.is_scalar(text) and pd.isna(text) else text


def _one_text(text: str) -> str:
    """`text` on one line, without its final period (the answer format adds one)."""
    return " ".join(text.split()).removesuffix(".")


def _perturbation_texts(
    control: Sequence[str], perturbed: Sequence[str], name: str, *, n_genes: int, upper: bool
) -> tuple[str, str]:
    prompt = prompts.perturbation(control, perturbation_name=name, n_genes=n_genes, upper=upper)
    return prompt, prompts.answer(prompts.cell_sentence(perturbed, upper=upper))
