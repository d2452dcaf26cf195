"""Sampling cell sentences from a C2S model and reading them into expression.

The engine behind :func:`sc_c2s.tl.generate` (single cells and samples of cells of a tissue),
:func:`sc_c2s.tl.predict_perturbation` and :func:`sc_c2s.tl.summarize`: seeded per-cell sampling that does not
depend on the batch, the token budget and stop tokens of a vocabulary, distinct genes and exact lengths, and the
collection of generated sentences into a sparse matrix over the genes of the data or the checkpoint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg
from scipy import sparse

from sc_c2s import _dask, prompts
from sc_c2s._data import DataHandler
from sc_c2s._rank_model import RankFit
from sc_c2s._utils._validate import (
    AnyRandom,
    check_fits_in_memory,
    check_number,
    check_positive_int,
    check_random_state,
    check_rank_fit,
)
from sc_c2s.models import _runtime
from sc_c2s.models._words import WordConstraint, WordTrie, distinct_words

from ._from_sentences import COUNTS, gene_index, read, vocabulary
from ._utils import PREFIX_PROMPTS, keep_answer_prefix

if TYPE_CHECKING:
    import torch
    from distributed import Client
    from mudata import MuData

    from sc_c2s.models._model import C2SModel

#: Extra genes' worth of new tokens allowed beyond `n_genes`, as a share of `n_genes`.
_SLACK = 0.1
#: The period that ends a generated sentence: one followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
#: Automatic batch on a CPU: larger than for annotation, since hundreds of decoding steps share its overhead.
CPU_BATCH = 32
#: Bytes of the result per generated gene besides its word in the sentence: a float32 value and an int32 column.
_ENTRY_BYTES = 8
#: Bytes of the result per generated cell besides its genes: the sentence string, its name, counts, bookkeeping.
_CELL_BYTES = 256


@dataclass
class Target:
    """Where generated sentences go: the vocabulary, the rank fit and the columns of the result."""

    words: np.ndarray
    """Gene words that generated sentences are matched against."""
    rank_fit: dict[str, Any]
    var: pd.DataFrame
    """``var`` of the result."""
    columns: np.ndarray | None
    """Column of the result for each word (``-1``: none); ``None`` when the words are the columns."""
    source: str
    """``"adata"`` or ``"checkpoint"``, for the parameters."""


def check_sampling(
    *,
    n_genes: int | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    random_state: AnyRandom,
    none_for_model: bool = False,
) -> int:
    """Check the sampling arguments; return the seed.

    ``n_genes=None`` (the model's) is valid; with `none_for_model`, ``temperature=None`` (the model's) is too.
    """
    check_positive_int(n_genes, "n_genes", none_ok=True)
    check_number(temperature, "temperature", low=0, low_open=True, none_ok=none_for_model)
    check_positive_int(top_k, "top_k", none_ok=True)
    check_number(top_p, "top_p", low=0, high=1, low_open=True, none_ok=True)
    return check_random_state(random_state)


def model_temperature(c2s_model: C2SModel, temperature: float | None) -> float:
    """`temperature`, or for ``None`` the one chosen for the model when it was fine-tuned, else 1.0."""
    if temperature is not None:
        return temperature
    chosen = c2s_model.metadata.temperature
    if chosen is None:
        return 1.0
    logg.info(f"    sampling at the model's temperature, {chosen}")
    return chosen


def write_cells(
    c2s_model: C2SModel,
    target: Target,
    prompt_texts: Sequence[str],
    codes: np.ndarray,
    *,
    n_genes: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    unique_genes: bool,
    exact_length: bool,
    random_state: int,
    batch_size: int | None,
    lengths: Sequence[int] | None = None,
    distribute: bool = False,
    client: Client | None = None,
    device: str | torch.device | None = None,
) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray, dict[str, Any]]:
    """Sample a sentence for each cell from its prompt and read it into expression over `target`.

    Cell ``i`` is prompted with ``prompt_texts[codes[i]]``. Returns the expression, the sentences, the counts of
    :data:`COUNTS` and the decoding parameters chosen (batch size, token budget, whether genes were unique); the
    caller checks first that the result fits in memory (:func:`check_memory`). With `distribute`, chunks of cells
    are generated over Dask (on `client` or the active one; workers load the model on `device` or their own), with
    the same result. `lengths` are the genes asked for by each prompt, at most `n_genes` (``None``: `n_genes` for
    every prompt), which `exact_length` holds the sentences to.
    """
    budget = token_budget(c2s_model, target.words, n_genes, unique_genes=unique_genes)
    prompt_ids = _runtime.tokenize(c2s_model.tokenizer, list(prompt_texts))
    if batch_size is None and not _runtime.sizes_to_memory(c2s_model.device):
        batch_size = CPU_BATCH
    batch_size = _runtime.resolve_batch_size(batch_size, c2s_model.device)
    opening = None
    if unique_genes or exact_length:
        opening = opening_spellings(c2s_model, target.words, budget, prompt_ids, batch_size=batch_size)
    if opening is not None:
        spell_first(budget, opening, eos_id=c2s_model.tokenizer.eos_token_id)
    check_room(c2s_model, prompt_ids, budget, n_genes=n_genes, unique_genes=unique_genes)
    starts = _word_starts(c2s_model.tokenizer, reference=budget["reference"]) if exact_length else None
    n_words = _sentence_length(budget, n_genes, unique_genes=unique_genes) if exact_length else None
    if n_words is not None and lengths is not None:
        n_words = np.minimum(np.asarray(lengths, dtype=np.int64), n_words)  # the words of each prompt's sentences
    sampling = {
        "prompt_ids": prompt_ids,
        "max_new_tokens": budget["max_new_tokens"],
        "stop_ids": budget["stop_ids"],
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "gene_ids": budget["gene_ids"] if unique_genes else None,
        "gene_tokens": budget["gene_tokens"] if unique_genes else None,
        "length": None if starts is None else (n_words, *starts),
        "opening": opening,
        "random_state": random_state,
        "batch_size": batch_size,
    }
    if distribute:
        X, sentences, counts = _dask.map_cells(
            _generate_cells,
            model=c2s_model,
            device=device,
            client=client,
            sliced={"codes": codes},
            target=target,
            **sampling,
        )
    else:
        X, sentences, counts = _generate_cells(c2s_model, codes=codes, target=target, **sampling)
    written = {
        "unique_genes": unique_genes and (budget["gene_ids"] is not None or budget["gene_tokens"] is not None),
        "batch_size": batch_size,
        "max_new_tokens": budget["max_new_tokens"],
        "tokens_per_gene": budget["tokens_per_gene"],
    }
    return X, sentences, counts, written


def opening_spellings(
    c2s_model: C2SModel,
    words: np.ndarray,
    budget: dict[str, Any],
    prompt_ids: list[list[int]],
    *,
    batch_size: int | None,
) -> list[list[int]] | None:
    """Return the tokens of each gene as the first word of a sentence, where the model spells it otherwise.

    A checkpoint fine-tuned with nothing between prompt and answer (``metadata.answer_prefix`` ``""``, as the
    published fine-tuning code joins them) learnt its first gene spelt without a space, which sub-word tokenizers
    spell with other tokens. Where the metadata records no prefix, the first
    :data:`~sc_c2s.tl._utils.PREFIX_PROMPTS` prompts decide once, as for annotation: the form whose first tokens
    are the likelier next token wins, the space on a tie. Genes are in the order of ``budget["gene_tokens"]``
    (those the tokenizer spells); ``None`` where the first gene is spelt as the others.
    """
    prefix = c2s_model.metadata.answer_prefix
    if budget["gene_ids"] is not None or prefix == " ":  # one token per gene, or genes written after a space
        return None
    tokenizer = c2s_model.tokenizer
    upper = c2s_model.metadata.upper_case
    unspaced = _runtime.tokenize(
        tokenizer, [prompts.cell_sentence([w], upper=upper) for w in words], special_tokens=False
    )
    if unspaced == budget["spellings"]:
        return None
    if prefix is None:
        prefix = _detect_prefix(c2s_model, prompt_ids, budget["spellings"], unspaced, batch_size=batch_size)
    if prefix != "":
        return None
    return [
        first for seq, first in zip(budget["spellings"], unspaced, strict=True) if tokenizer.unk_token_id not in seq
    ]


def spell_first(budget: dict[str, Any], opening: list[list[int]], *, eos_id: int | None) -> None:
    """Make `budget` (of :func:`token_budget`) hold sentences whose first gene is spelt `opening`.

    Room for the tokens by which a first gene's spelling is longer (``extra_tokens``), and no stop token that is
    part of one: a token ending in a period stops a sentence only where no gene is spelt with it.
    """
    longer = max(0, *(len(first) - len(seq) for first, seq in zip(opening, budget["gene_tokens"], strict=True)))
    budget["extra_tokens"] = longer
    budget["max_new_tokens"] += longer
    inside = {token for first in opening for token in first}
    budget["stop_ids"] = [t for t in budget["stop_ids"] if t == eos_id or t not in inside]


def _detect_prefix(
    c2s_model: C2SModel,
    prompt_ids: list[list[int]],
    spaced: list[list[int]],
    unspaced: list[list[int]],
    *,
    batch_size: int | None,
) -> str:
    """Decide whether the model's answers follow the prompt after a space, by its next token after the prompts."""
    from scipy.special import logsumexp

    from sc_c2s.models import _candidates

    firsts = {form: sorted({ids[0] for ids in spellings if ids}) for form, spellings in ((" ", spaced), ("", unspaced))}
    tokens = sorted({*firsts[" "], *firsts[""]})
    column = {t: i for i, t in enumerate(tokens)}
    loglik = _candidates.score_answers(
        c2s_model.model,
        prompt_ids[:PREFIX_PROMPTS],
        [[t] for t in tokens],
        batch_size=batch_size,
        pad_id=_runtime.pad_id(c2s_model.tokenizer),
        desc=None,
    )
    scores = {
        form: float(logsumexp(loglik[:, [column[t] for t in ids]], axis=1).mean()) for form, ids in firsts.items()
    }
    return keep_answer_prefix(c2s_model, scores, what="sentences", measure="log-probability of a first gene")


def check_room(
    c2s_model: C2SModel, prompt_ids: list[list[int]], budget: dict[str, Any], *, n_genes: int, unique_genes: bool
) -> None:
    """Refuse sentences that do not fit after their prompts in the model's context, naming an `n_genes` that does."""
    limit = getattr(c2s_model.model.config, "max_position_embeddings", None)
    longest = max(map(len, prompt_ids), default=0)
    if limit is None or longest + budget["max_new_tokens"] <= limit:
        return
    n_distinct = budget["n_distinct"] if unique_genes else None
    most = most_that_fit(
        n_genes,
        lambda n: (
            longest
            + new_tokens(budget["tokens_per_gene"], budget["gene_tokens"], n, n_distinct)
            + budget["extra_tokens"]
            <= limit
        ),
    )
    advice = f"ask for at most `n_genes={most}`" if most else "the prompts alone nearly fill it"
    msg = (
        f"Prompts of up to {longest} tokens and sentences of {n_genes} genes (up to {budget['max_new_tokens']} "
        f"tokens) do not fit in the {limit} tokens {c2s_model.name!r} reads; {advice}."
    )
    raise ValueError(msg)


def most_that_fit(n_genes: int, fits: Callable[[int], bool]) -> int:
    """Return the most genes, below `n_genes`, for which `fits` holds (0 if none), by bisection.

    `fits` must not hold for `n_genes`, and room must only grow with the genes.
    """
    most, too_many = 0, n_genes
    while too_many - most > 1:
        n = (most + too_many) // 2
        most, too_many = (n, too_many) if fits(n) else (most, n)
    return most


def _sentence_length(budget: dict[str, Any], n_genes: int, *, unique_genes: bool) -> int:
    """Words of a sentence of exact length: `n_genes`, or all the genes there are if distinct genes are fewer."""
    n_distinct = budget["n_distinct"]
    if not unique_genes or n_distinct is None or n_genes <= n_distinct:
        return n_genes
    logg.warning(
        f"Sentences of distinct genes can hold only the {n_distinct} genes of the vocabulary, not {n_genes}; they "
        f"are {n_distinct} genes long. Ask for fewer with `n_genes`."
    )
    return n_distinct


def valid_share(counts: np.ndarray) -> str:
    """Say which share of the generated words are genes of the vocabulary, for the log."""
    n_words = counts.sum()
    valid = counts[:, 0].sum() / n_words if n_words else float("nan")
    return f"{valid:.1%} of the generated words are genes of the vocabulary"


def check_memory(n_cells: int, *, n_genes: int, words: np.ndarray, name: str) -> None:
    """Refuse a request whose result (expression, sentences, names) would not fit in the available memory."""
    word_bytes = float(np.mean([len(w) for w in words])) + 1 if len(words) else 8.0
    check_fits_in_memory(
        n_cells,
        n_genes * (_ENTRY_BYTES + word_bytes) + _CELL_BYTES,
        name=name,
        unit="cells",
        fix="Generate them in several calls with fewer cells, each with its own `random_state` (the same seed "
        "gives the same cells), and join the results with `anndata.concat(results, index_unique='-')` (each call "
        "names its cells from 0).",
    )


def target_of(adata: AnnData | MuData | None, *, mod: str | None, model: C2SModel) -> Target:
    """Vocabulary, rank fit and result columns from `adata`'s sentences, or from the checkpoint."""
    if adata is None:
        metadata = model.metadata
        missing = [name for name in ("vocabulary", "rank_fit") if getattr(metadata, name) is None]
        if missing:
            msg = (
                f"The checkpoint {model.name!r} carries no {' and no '.join(missing)}, so generated sentences cannot "
                "be turned into expression on their own. Pass `adata` that went through "
                "`sc_c2s.pp.to_sentences(adata)`."
            )
            raise ValueError(msg)
        words = np.asarray(metadata.vocabulary, dtype=object)
        return Target(
            words, dict(metadata.rank_fit), pd.DataFrame(index=pd.Index(words, dtype=str)), None, "checkpoint"
        )

    handler = DataHandler(adata, mod)
    c2s = handler.c2s()
    rank_fit = check_rank_fit(c2s)
    params = c2s["params"]
    words = np.asarray(c2s["genes"], dtype=object)
    var = pd.DataFrame(index=handler.adata.var_names.astype(str))  # as AnnData makes names of other types
    symbols = params.get("gene_symbols")
    if symbols is not None and symbols in handler.adata.var.columns:
        var[symbols] = handler.adata.var[symbols].to_numpy()
    columns = _columns(handler.adata, words, params)
    if not (columns >= 0).any():
        msg = (
            f"None of the {len(words)} genes of the sentences (e.g. {words[0]!r}) is a gene of `var` now, so "
            "generated expression has no column to go to: were `var_names` renamed after `sc_c2s.pp.to_sentences`? "
            "Run it again on the data as it is, or put the names back."
        )
        raise ValueError(msg)
    if n_without := int((columns < 0).sum()):
        in_raw = params.get("use_raw", False) and handler.adata.raw is not None
        logg.warning(
            f"{n_without} of {len(words)} genes of the sentences "
            f"{'were ranked in `.raw` and are not' if in_raw else 'are no longer'} in `var`: the cells' sentences "
            f"hold them, but their expression in `X` leaves them out. To keep them, pass "
            f"{'`adata.raw.to_adata()`' if in_raw else 'the data as it was ranked'}."
        )
    return Target(words, dict(rank_fit), var, columns, "adata")


def _columns(adata: AnnData, words: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Column of ``adata.var`` of each word of the sentences (``-1``: none), found by gene name.

    The words are the names (or the `gene_symbols`) of the genes of the matrix `to_sentences` ranked, so genes
    that were reordered, or left out of ``var`` since, or ranked in ``.raw`` only, go to the right column or none.
    """
    ranked = adata.raw if params.get("use_raw", False) and adata.raw is not None else adata
    symbols = params.get("gene_symbols")
    names = pd.Index(words)
    if symbols is not None:
        if symbols not in ranked.var.columns:
            msg = (
                f"The sentences name genes by var[{symbols!r}] (`gene_symbols` of `sc_c2s.pp.to_sentences`), which "
                "is no longer there; put the column back, or run `to_sentences` again."
            )
            raise KeyError(msg)
        by_symbol = pd.Index(ranked.var[symbols].astype(str))
        if not by_symbol.is_unique:
            msg = f"var[{symbols!r}] holds duplicated names since `sc_c2s.pp.to_sentences`; run it again."
            raise ValueError(msg)
        at = by_symbol.get_indexer(names)
        names = pd.Index(np.where(at >= 0, ranked.var_names.astype(str)[at], None))
    if not adata.var_names.is_unique:
        msg = "var_names are not unique; make them unique (`adata.var_names_make_unique()`) before generating."
        raise ValueError(msg)
    return adata.var_names.astype(str).get_indexer(names)  # words are strings, as names of other types became


def _selection(columns: np.ndarray, n_columns: int) -> sparse.csr_matrix:
    """Build the 0/1 matrix that moves word ``i`` to column ``columns[i]``, dropping words whose column is ``-1``."""
    rows = np.flatnonzero(columns >= 0)
    return sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, columns[rows])), shape=(len(columns), n_columns)
    )


def token_budget(model: C2SModel, words: np.ndarray, n_genes: int, *, unique_genes: bool = False) -> dict[str, Any]:
    """Size the new tokens for `n_genes` genes and their period, and choose the tokens that end a sentence.

    Tokens per gene are measured on the vocabulary as the model writes it (a space, then the upper-cased
    word). A token whose text ends a sentence (a period, alone or merged with the letters before it as
    Gemma's tokenizer does) ends it only if no gene contains that token (as in ``RP11-34P13.3`` with a sub-word
    tokenizer); otherwise the text is cut at the period afterwards. ``gene_ids`` are the tokens of the genes
    the tokenizer knows, when every gene is one token; else ``None``. ``gene_tokens`` are the tokens of each
    gene the tokenizer spells without an unknown token, when some gene takes several (sentences of distinct
    genes are then written from them: see :mod:`sc_c2s.models._words`); else ``None``. With them and
    `unique_genes`, the token budget suffices for the `n_genes` longest genes. ``reference`` is the first token
    of the first gene, which :func:`_word_starts` writes other tokens after; ``spellings`` the tokens of every gene;
    ``extra_tokens`` the tokens :func:`spell_first` adds to ``max_new_tokens``.
    """
    tokenizer = model.tokenizer
    spaced = [" " + prompts.cell_sentence([w], upper=model.metadata.upper_case) for w in words]
    ids = _runtime.tokenize(tokenizer, spaced, special_tokens=False)
    if tokenizer.unk_token_id is not None and all(tokenizer.unk_token_id in i for i in ids):
        msg = (
            f"None of the {len(words)} genes of the data is a word of {model.name!r}, so the sentences it writes "
            "cannot be read back into them. Rank the genes under the names the model was trained on (e.g. symbols, "
            "not Ensembl IDs; `gene_symbols=` of `sc_c2s.pp.to_sentences`)."
        )
        raise ValueError(msg)
    tokens_per_gene = float(np.mean([len(i) for i in ids]))
    in_genes = {t for i in ids for t in i}
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    ends = [i for i, text in enumerate(texts) if _SENTENCE_END.search(text) and i not in in_genes]
    ends = [i for i in ends if i != tokenizer.unk_token_id and i not in tokenizer.all_special_ids]
    stop_ids = sorted({*([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []), *ends})
    single = [i[0] for i in ids if len(i) == 1 and i[0] != tokenizer.unk_token_id]
    one_token = all(len(i) == 1 for i in ids)
    gene_ids = np.unique(single) if one_token else None
    gene_tokens = (None if one_token else [i for i in ids if tokenizer.unk_token_id not in i]) or None
    n_distinct = None
    if gene_ids is not None or gene_tokens is not None:
        n_distinct = len(gene_ids) if gene_ids is not None else len(distinct_words(gene_tokens))
    return {
        "tokens_per_gene": round(tokens_per_gene, 3),
        "max_new_tokens": new_tokens(tokens_per_gene, gene_tokens, n_genes, n_distinct if unique_genes else None),
        "stop_ids": stop_ids,
        "gene_ids": gene_ids,
        "gene_tokens": gene_tokens,
        "n_distinct": n_distinct,
        "reference": ids[0][0],
        "spellings": ids,
        "extra_tokens": 0,
    }


def new_tokens(
    tokens_per_gene: float, gene_tokens: list[list[int]] | None, n_genes: int, n_distinct: int | None
) -> int:
    """Return the new tokens to allow for sentences of `n_genes` genes (at most `n_distinct`, if genes are unique).

    Their mean number of tokens, with a tenth more genes to spare, and room for the longest distinct genes.
    """
    if n_distinct is not None:
        n_genes = min(n_genes, n_distinct)
    max_new_tokens = math.ceil(tokens_per_gene * math.ceil(n_genes * (1 + _SLACK))) + 2
    if n_distinct is not None and gene_tokens is not None:
        longest = sorted(map(len, gene_tokens), reverse=True)[:n_genes]
        max_new_tokens = max(max_new_tokens, sum(longest) + 1)
    return max_new_tokens


def _word_starts(tokenizer, *, reference: int) -> tuple[np.ndarray, np.ndarray]:
    """Which tokens of the vocabulary begin a word, and which would break the count of words.

    A token begins a word if, written after `reference`, it adds a space and then more text without whitespace.
    Decoding pairs reads the word-start marker of any tokenizer (``Ġ`` of byte-level BPE, ``▁`` of
    SentencePiece) and makes every token of a word-level tokenizer a word. A token breaks the count if it holds
    whitespace elsewhere (a line break, two spaces, words merged into one token) or is special; sentences of
    an exact length never contain one.
    """
    head = len(tokenizer.decode([reference], clean_up_tokenization_spaces=False))
    texts = tokenizer.batch_decode([[reference, i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    texts = [text[head:] for text in texts]
    starts = np.array([text[:1].isspace() and len(text) > 1 and not _has_space(text[1:]) for text in texts])
    breaks = np.array([not text or _has_space(text) for text in texts]) & ~starts
    starts[tokenizer.all_special_ids] = False
    breaks[tokenizer.all_special_ids] = True
    return starts, breaks


def _has_space(text: str) -> bool:
    return any(c.isspace() for c in text)


def _uniforms(random_state: int, cell: int, n_steps: int) -> np.ndarray:
    """Draw the `n_steps` uniform numbers of one cell.

    A counter-based generator (Philox) jumps straight to the cell's block, so its numbers depend only on the
    seed, the cell and `n_steps`, not on the batch it is in.
    """
    width = 4 * math.ceil(n_steps / 4)  # Philox yields blocks of four numbers
    bit_generator = np.random.Philox(key=random_state)
    bit_generator.advance(int(cell) * width // 4)
    return np.random.Generator(bit_generator).random(n_steps)


class _Length(NamedTuple):
    """What `exact_length` needs, made once per call.

    The number of words, and three masks over the model's output vocabulary (which may be padded beyond the
    tokenizer's): the tokens that begin a word, those that stop the sentence, and those never written (they
    would break the count of words; the padding beyond the tokenizer is among them).
    """

    n_words: int | torch.Tensor
    """Words of every row, or of each row of a batch."""
    starts: torch.Tensor
    is_stop: torch.Tensor
    breaks: torch.Tensor
    opens: bool = False
    """Whether the first token begins a word whatever it is (a sentence that follows its prompt without a space)."""


class _Cells(NamedTuple):
    """What holding a multi-cell text to its cells needs, made once per batch.

    The cells of each row, and two masks over the model's output vocabulary: the tokens that end a cell (as 1) and
    those that stop the text.
    """

    n_cells: torch.Tensor
    ends: torch.Tensor
    is_stop: torch.Tensor


class _Sampler:
    """Chooses the next token of each row of a batch from the row's own uniform numbers, one step per call.

    With `gene_ids`, a row never samples one of those tokens twice. With `blocked`, a row never writes those
    tokens. With `length`, a row cannot stop before it has that many words, and after that it can only stop or
    continue its last word. With `words`, each row writes distinct genes of several tokens each (and an exact
    number of them if the constraint says so). With `reset_ids`, sampling one of those tokens lets a row use its
    genes again (a new cell of a multi-cell text). With `cells`, a row cannot stop before it has ended that many
    cells.
    """

    def __init__(
        self,
        uniforms: torch.Tensor,
        *,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        gene_ids: torch.Tensor | None,
        length: _Length | None,
        words: WordConstraint | None = None,
        reset_ids: torch.Tensor | None = None,
        blocked: torch.Tensor | None = None,
        cells: _Cells | None = None,
    ):
        import torch

        self.uniforms, self.temperature, self.top_k, self.top_p = uniforms, temperature, top_k, top_p
        self.gene_ids, self.used, self.reset_ids, self.blocked = gene_ids, None, reset_ids, blocked
        self.length, self.constraint, self.cells = length, words, cells
        self.words = torch.zeros(len(uniforms), dtype=torch.long, device=uniforms.device)
        self.ended = torch.zeros_like(self.words)
        self.step = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        logits = logits.float()
        if self.blocked is not None:
            logits = logits.masked_fill(self.blocked, -torch.inf)
        if self.gene_ids is not None:
            if self.used is None:
                self.used = torch.zeros_like(logits, dtype=torch.bool)
            logits = logits.masked_fill(self.used, -torch.inf)
        if self.length is not None:
            short = (self.words < self.length.n_words)[:, None]
            blocked = torch.where(short, self.length.is_stop, self.length.starts) | self.length.breaks
            logits = logits.masked_fill(blocked, -torch.inf)
        if self.constraint is not None:
            logits = logits.masked_fill(~self.constraint.allowed(), -torch.inf)
        if self.cells is not None:
            early = (self.ended < self.cells.n_cells)[:, None]
            logits = logits.masked_fill(early & self.cells.is_stop, -torch.inf)
        token = _sample_token(logits, self.uniforms[:, self.step], self.temperature, self.top_k, self.top_p)
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.gene_ids is not None:
            is_gene = torch.isin(token, self.gene_ids)
            self.used[is_gene.nonzero()[:, 0], token[is_gene]] = True
            if self.reset_ids is not None:
                self.used[torch.isin(token, self.reset_ids)] = False
        if self.length is not None:
            self.words += self.length.starts[token] | (self.step == 0 and self.length.opens)
        if self.cells is not None:
            self.ended += self.cells.ends[token]
        self.step += 1
        return token


def sample(
    c2s: C2SModel,
    prompt_ids: list[list[int]],
    codes: np.ndarray,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gene_ids: np.ndarray | None,
    length: tuple[int | np.ndarray, np.ndarray, np.ndarray] | None,
    random_state: int,
    batch_size: int | None,
    sink: Callable[[np.ndarray, list[str]], None],
    gene_tokens: list[list[int]] | None = None,
    decode: Callable[[Any, np.ndarray, list[int]], list[str]] | None = None,
    reset_ids: list[int] | None = None,
    n_cells: np.ndarray | None = None,
    first_cell: int = 0,
    cells: str | None = None,
    opening: list[list[int]] | None = None,
) -> None:
    """Generate a sentence for each cell from its cell type's prompt; hand each batch's cells and sentences to `sink`.

    Cell ``i`` is prompted with ``prompt_ids[codes[i]]``; sentences come without their closing period. `length` holds
    the number of words (one, or one per prompt) and the masks of :func:`_word_starts`; `gene_tokens` the tokens of each
    gene, to write distinct genes of several tokens (then it sets the length, not `length`). `decode` turns a batch's
    new tokens into texts (default: each sentence up to its closing period); `reset_ids` end a cell of a multi-cell
    text, after which `gene_ids` may be written again; without them, a sentence of `gene_ids` is written from those
    tokens and `stop_ids` only, as one of `gene_tokens` is from the genes' spellings. `n_cells` holds, per prompt,
    the cells its text must end (each with one of `reset_ids` that is not a stop token) before it may stop. Cell
    ``i`` draws the random numbers of cell ``first_cell + i``, so a chunk of cells gets what it would get among all
    cells. `cells` names the argument that sets how many cells a multi-cell prompt or answer holds, for the message
    of a text too long. `opening` holds the tokens of each gene of `gene_tokens` as the first word of a sentence
    that follows its prompt without a space (:func:`opening_spellings`); with `length`, its first token then begins a
    word whatever it is.
    """
    import torch

    _runtime.check_context(c2s.model, prompt_ids, name=c2s.name, room=max_new_tokens, cells=cells)
    ids = [prompt_ids[code] for code in codes.tolist()]  # shared lists: one per cell type
    pad_id = _runtime.pad_id(c2s.tokenizer)
    gene_tensor = None if gene_ids is None else torch.as_tensor(gene_ids, device=c2s.device)
    exact, trie, n_logits = None, None, c2s.model.config.vocab_size
    is_stop = torch.zeros(n_logits, dtype=torch.bool, device=c2s.device)
    is_stop[stop_ids] = True
    blocked = None
    if gene_tensor is not None and reset_ids is None:
        blocked = torch.ones(n_logits, dtype=torch.bool, device=c2s.device)
        blocked[gene_tensor] = False
        blocked[stop_ids] = False
    if gene_tokens is not None:
        trie = WordTrie(gene_tokens, n_logits=n_logits, stop_ids=stop_ids, device=c2s.device, opening=opening)
    elif length is not None:
        _, starts, breaks = length
        is_start = torch.zeros(n_logits, dtype=torch.bool, device=c2s.device)
        is_start[: len(starts)] = torch.as_tensor(starts, device=c2s.device)
        is_break = torch.ones(n_logits, dtype=torch.bool, device=c2s.device)
        is_break[: len(breaks)] = torch.as_tensor(breaks, device=c2s.device)
        exact = _Length(length[0], is_start, is_stop, is_break & ~is_stop, opens=opening is not None)
    ends = None
    if n_cells is not None:
        ends = torch.zeros(n_logits, dtype=torch.long, device=c2s.device)
        ends[sorted(set(reset_ids) - set(stop_ids))] = 1

    def write(batch: _runtime.Batch) -> None:
        uniforms = np.stack([_uniforms(random_state, first_cell + i, max_new_tokens) for i in batch.index])
        n_words = None
        if length is not None:
            n_words = length[0]
            if isinstance(n_words, np.ndarray):  # one per prompt: the rows' own
                n_words = torch.as_tensor(n_words[codes[batch.index]], device=c2s.device)
        sampler = _Sampler(
            torch.from_numpy(uniforms).to(c2s.device, torch.float32),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            gene_ids=gene_tensor,
            length=None if exact is None else exact._replace(n_words=n_words),
            words=None if trie is None else WordConstraint(trie, len(batch.index), n_words=n_words),
            reset_ids=None if reset_ids is None else torch.as_tensor(reset_ids, device=c2s.device),
            blocked=blocked,
            cells=None
            if ends is None
            else _Cells(torch.as_tensor(n_cells[codes[batch.index]], device=c2s.device), ends, is_stop),
        )
        tokens, _ = _runtime.decode(
            c2s.model, batch, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id, choose=sampler
        )
        sink(batch.index, (decode or _texts)(c2s.tokenizer, tokens.cpu().numpy(), stop_ids))

    with _runtime.inference(c2s.model):
        _runtime.run_batches(
            c2s.model, ids, write, batch_size=batch_size, pad_id=pad_id, desc="generating", room=max_new_tokens
        )


def _generate_cells(
    c2s: C2SModel, *, codes: np.ndarray, target: Target, first_cell: int = 0, **sampling: Any
) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """Generate cells ``first_cell …`` (of types `codes`); read them into expression (:meth:`Collector.result`)."""
    collector = Collector(target, n_cells=len(codes))
    sample(c2s, codes=codes, sink=collector, first_cell=first_cell, **sampling)
    return collector.result()


class Collector:
    """Reads the sentences of each batch into expression as they come; :meth:`result` gives the whole.

    Batches come in any order of cells; their rows are kept as small CSR blocks and put in cell order into
    arrays of the final size at the end, each block freed once copied, so the result is never held twice.
    """

    def __init__(self, target: Target, *, n_cells: int):
        self.words = vocabulary(gene_index(target.words))
        self.fit = RankFit.from_dict(target.rank_fit)
        self.n_words, self.n_columns = len(target.words), len(target.var)
        self.selection = None if target.columns is None else _selection(target.columns, self.n_columns)
        self.sentences = np.empty(n_cells, dtype=object)
        self.counts = np.zeros((n_cells, len(COUNTS)), dtype=np.int32)
        self.blocks: list[tuple[np.ndarray, sparse.csr_matrix]] = []

    def __call__(self, index: np.ndarray, texts: list[str]) -> None:
        X, counts = read(texts, self.words, self.fit, n_genes=self.n_words)
        self.blocks.append((index, X if self.selection is None else sparse.csr_matrix(X @ self.selection)))
        self.sentences[index] = texts
        self.counts[index] = counts

    def result(self) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
        """Return the expression matrix, the sentences and the counts of :data:`COUNTS`, in cell order."""
        X = _assemble(self.blocks, n_cells=len(self.sentences), n_columns=self.n_columns)
        return X, self.sentences, self.counts


def _assemble(blocks: list[tuple[np.ndarray, sparse.csr_matrix]], *, n_cells: int, n_columns: int) -> sparse.csr_matrix:
    """Put the rows of CSR blocks into one float32 CSR matrix, in cell order; `blocks` is emptied on the way.

    Each block comes with the cells its rows belong to.
    """
    lengths = np.zeros(n_cells, dtype=np.int64)
    for index, block in blocks:
        lengths[index] = np.diff(block.indptr)
    nnz = int(lengths.sum())
    index_dtype = np.int32 if max(nnz, n_columns) < 2**31 else np.int64
    indptr = np.zeros(n_cells + 1, dtype=index_dtype)
    np.cumsum(lengths, out=indptr[1:])
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=index_dtype)
    while blocks:
        index, block = blocks.pop()
        block_lengths = np.diff(block.indptr)
        target = np.repeat(indptr[index] - block.indptr[:-1], block_lengths) + np.arange(block.nnz)
        data[target] = block.data
        indices[target] = block.indices
    return sparse.csr_matrix((data, indices, indptr), shape=(n_cells, n_columns))


def _sample_token(
    logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """One token per row by inverse transform sampling of the temperature, top-k and top-p filtered softmax."""
    import torch

    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, index = torch.topk(logits, top_k, dim=-1)
    else:
        values, index = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    if top_p is not None:
        # keep a token while the tokens before it hold less than top_p; the first is always kept
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    # u is mapped over the kept tokens in the order of their ids, not of their probabilities: two tokens of nearly
    # equal probability swap places in that order with the rounding of another batch shape, which would change
    # the token of almost every u, not only of a u at a boundary
    index, by_id = torch.sort(index, dim=-1)
    cumulative = probs.gather(-1, by_id).cumsum(-1)
    # the first token whose cumulative probability reaches u · total; never one of probability 0
    chosen = (cumulative < (uniform * cumulative[:, -1])[:, None]).sum(-1, keepdim=True)
    return index.gather(-1, chosen.clamp(max=index.shape[-1] - 1)).squeeze(-1)


def _texts(tokenizer, tokens: np.ndarray, stop_ids: list[int]) -> list[str]:
    """Text of each row of new tokens up to its stop token, cut at the closing period, spaces normalised."""
    rows = []
    for row in tokens:
        stops = np.flatnonzero(np.isin(row, stop_ids))
        rows.append(row[: stops[0] if len(stops) else len(row)].tolist())
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [" ".join(_SENTENCE_END.split(text, maxsplit=1)[0].split()) for text in texts]
