"""Multi-cell generation: samples of cells of a given tissue, written together in C2S-Scale's format."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from sc_c2s import _keys, prompts
from sc_c2s._utils._validate import check_positive_int
from sc_c2s.models import _runtime

from . import _sampling
from ._from_sentences import COUNTS, log10_record
from ._utils import check_task

if TYPE_CHECKING:
    from mudata import MuData

    from sc_c2s.models._model import C2SModel

#: The line that opens each cell of a multi-cell text; the number is ignored, cells are taken in order.
_CELL = re.compile(r"Cell\s*\d*\s*:", flags=re.IGNORECASE)
#: Tokens of each cell's ``Cell {i}:`` line and closing period, beside its genes.
_CELL_TOKENS = 8
#: Cells per multi-cell prompt unless given (C2S-Scale trained on samples of 5 to 20 cells).
CELLS_PER_SAMPLE = 5


def check_tissues(tissues: Mapping[str, int], cells_per_sample: int) -> int:
    """Check the request of `tissues` (tissue → number of cells) and `cells_per_sample`; return the cells asked for.

    Nothing is built per cell or sample, so that a request too large for memory can be refused before it is.
    """
    if not isinstance(tissues, Mapping):
        msg = f'`tissues` must be a mapping of tissue to number of cells, e.g. {{"lung": 10}}; got {tissues!r}.'
        raise TypeError(msg)
    bad = {t: n for t, n in tissues.items() if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 0}
    missing = [t for t in tissues if pd.api.types.is_scalar(t) and pd.isna(t)]  # None, NaN: no tissue to name
    names = [str(t) for t in tissues]
    if bad or missing or any(not t.strip() or "\n" in t for t in names) or not sum(tissues.values()):
        msg = (
            "`tissues` must map one-line tissue names to numbers of cells, at least one of them positive; "
            f"got {tissues!r}."
        )
        raise ValueError(msg)
    check_positive_int(cells_per_sample, "cells_per_sample")
    return int(sum(tissues.values()))


def requested_samples(tissues: Mapping[str, int], cells_per_sample: int) -> tuple[list[str], np.ndarray]:
    """Tissue and number of cells of each sample: `cells_per_sample` each, the last of a tissue takes the rest.

    The request is one that :func:`check_tissues` accepted.
    """
    sample_tissues, sizes = [], []
    for tissue, n in tissues.items():
        for start in range(0, int(n), cells_per_sample):
            sample_tissues.append(str(tissue))
            sizes.append(min(cells_per_sample, int(n) - start))
    return sample_tissues, np.asarray(sizes, dtype=np.int64)


def split_cells(text: str, n_cells: int) -> list[str]:
    """Return the sentences of the first `n_cells` ``Cell {i}:`` blocks of a text (``""`` for missing blocks).

    A sentence ends at its first word that ends with a period (which it loses); what follows in the block (the
    lone period that ends the text) is dropped. Periods inside gene names (``RP11-34P13.3``) stay.
    """
    sentences = []
    for block in _CELL.split(text)[1:]:
        words = []
        for word in block.split():
            words.append(word.removesuffix("."))
            if word.endswith("."):
                break
        sentences.append(" ".join(w for w in words if w))
    return (sentences + [""] * n_cells)[:n_cells]


def generate_tissues(
    adata: AnnData | MuData | None,
    *,
    c2s: C2SModel,
    tissues: Mapping[str, int],
    cells_per_sample: int,
    n_genes: int,
    organism: str,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    unique_genes: bool,
    exact_length: bool,
    random_state: int,
    batch_size: int | None,
    mod: str | None,
    start: object,
) -> AnnData:
    """Generate samples of cells of each tissue (see :func:`sc_c2s.tl.generate`)."""
    n_cells = check_tissues(tissues, cells_per_sample)
    if c2s.metadata.tissues is not None:
        unknown = sorted({str(t) for t, n in tissues.items() if n} - set(c2s.metadata.tissues))
        if unknown:
            msg = f"The model does not know the tissues {unknown}. It was trained on: {c2s.metadata.tissues}."
            raise ValueError(msg)
    check_task(c2s, "tissue_generation")
    target = _sampling.target_of(adata, mod=mod, model=c2s)
    _sampling.check_memory(n_cells, n_genes=n_genes, words=target.words, name="tissues")
    sample_tissues, sizes = requested_samples(tissues, cells_per_sample)
    budget = _sampling.token_budget(c2s, target.words, n_genes)
    per_cell = budget["max_new_tokens"] + _CELL_TOKENS
    max_new_tokens = int(sizes.max()) * per_cell
    eos = _runtime.eos_id(c2s.tokenizer)
    texts = [
        prompts.tissue_generation(t, n_cells=int(k), n_genes=n_genes, organism=organism)
        for t, k in zip(sample_tissues, sizes, strict=True)
    ]
    prompt_ids = _runtime.tokenize(c2s.tokenizer, texts)
    if batch_size is None and not _runtime.sizes_to_memory(c2s.device):
        batch_size = _sampling.CPU_BATCH
    batch_size = _runtime.resolve_batch_size(batch_size, c2s.device)
    first_cell = np.concatenate([[0], np.cumsum(sizes)])
    # a period ends a cell where every gene is one token; sub-word tokenizers write periods inside gene names
    held = exact_length and budget["gene_ids"] is not None
    collector = _sampling.Collector(target, n_cells=int(sizes.sum()))

    def sink(index: np.ndarray, generated: list[str]) -> None:
        for sample, text in zip(index, generated, strict=True):
            cells = np.arange(first_cell[sample], first_cell[sample + 1])
            collector(cells, split_cells(text, len(cells)))

    _sampling.sample(
        c2s,
        prompt_ids,
        np.arange(len(sizes)),
        max_new_tokens=max_new_tokens,
        stop_ids=[eos],
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        gene_ids=budget["gene_ids"] if unique_genes else None,
        length=None,
        random_state=random_state,
        batch_size=batch_size,
        sink=sink,
        decode=whole_texts,
        reset_ids=_runtime.period_ids(c2s.tokenizer),
        n_cells=sizes if held else None,
        cells="cells_per_sample",
    )
    X, sentences, counts = collector.result()
    n = len(sentences)
    if n_empty := sum(not sentence for sentence in sentences):
        trained = c2s.metadata.training.get("n_cells")
        why = "wrote no gene in them" if held else "ended their samples before writing them"
        logg.warning(
            f"{n_empty} of {n} generated cells are empty: the model {why}"
            f"{f' (it was trained on {trained[0]} to {trained[1]} cells per sample)' if trained else ''}. They are "
            "rows of zeros: leave them out with `generated[generated.obs['n_valid_genes'] > 0]`, or ask for fewer "
            "`cells_per_sample`."
        )
    sample_of_cell = np.repeat(np.arange(len(sizes)), sizes)
    obs = pd.DataFrame(counts, columns=COUNTS, index=pd.Index([f"generated-{i}" for i in range(n)]))
    names = list(dict.fromkeys(sample_tissues))
    tissue_codes = np.asarray([names.index(t) for t in sample_tissues])[sample_of_cell]
    obs.insert(0, _keys.GENERATED_TISSUE, pd.Categorical.from_codes(tissue_codes, categories=names))
    samples = [f"sample-{s}" for s in range(len(sizes))]  # in order, not as text (sample-10 after sample-9)
    obs.insert(1, _keys.GENERATED_SAMPLE, pd.Categorical.from_codes(sample_of_cell, categories=samples))
    obs.insert(2, _keys.SENTENCE, sentences)
    params = {
        "tissues": names,
        "n_cells": [int(sizes[np.asarray(sample_tissues) == t].sum()) for t in names],
        "cells_per_sample": cells_per_sample,
        "n_genes": n_genes,
        "organism": organism,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "unique_genes": unique_genes and budget["gene_ids"] is not None,
        "exact_length": held,
        "random_state": random_state,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "tokens_per_gene": budget["tokens_per_gene"],
        "vocabulary": target.source,
        "rank_fit": target.rank_fit,
        **c2s.provenance(),
    }
    params = {k: v for k, v in params.items() if v is not None}
    result = AnnData(X, obs=obs, var=target.var, uns={_keys.GENERATE: {"params": params}, _keys.LOG1P: log10_record()})
    n_words = counts.sum()
    valid = counts[:, 0].sum() / n_words if n_words else math.nan
    logg.info(
        "    finished",
        time=start,
        deep=f"generated {n} cells in {len(sizes)} samples; {valid:.1%} of the generated words are genes of the "
        "vocabulary",
    )
    return result


def whole_texts(tokenizer, tokens: np.ndarray, stop_ids: list[int]) -> list[str]:
    """Whole text of each row of new tokens up to its first stop token."""
    rows = []
    for row in tokens:
        stops = np.flatnonzero(np.isin(row, stop_ids))
        rows.append(row[: stops[0] if len(stops) else len(row)].tolist())
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
