from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from sc_c2s import _dask, _keys, prompts
from sc_c2s._docs import (
    doc_adata,
    doc_batch_size,
    doc_device,
    doc_mod,
    doc_model,
    doc_organism,
    doc_params,
    doc_seed,
)
from sc_c2s._utils._validate import AnyRandom, check_flag, check_positive_int

from ._from_sentences import COUNTS, log10_record
from ._sampling import check_memory, check_sampling, model_temperature, target_of, valid_share, write_cells
from ._utils import check_task, model_n_genes, model_organism, prompt_cells

if TYPE_CHECKING:
    import os

    import torch
    from distributed import Client
    from mudata import MuData

    from sc_c2s.models._model import C2SModel


@doc_params(
    doc_adata=doc_adata,
    doc_model=doc_model,
    doc_organism=doc_organism,
    doc_batch_size=doc_batch_size,
    doc_device=doc_device,
    doc_mod=doc_mod,
    doc_seed=doc_seed,
)
def generate(
    adata: AnnData | MuData | None = None,
    *,
    model: C2SModel | str | os.PathLike[str],
    cell_types: Sequence[str] | Mapping[str, int] | None = None,
    tissues: Mapping[str, int] | None = None,
    cells_per_sample: int | None = None,
    n_genes: int | None = None,
    organism: prompts.Organism | None = None,
    temperature: float | None = None,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    unique_genes: bool = True,
    exact_length: bool = True,
    random_state: AnyRandom = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    mod: str | None = None,
    client: Client | None = None,
) -> AnnData:
    """Generate cells of given types with a C2S model and turn them into expression.

    Each cell is prompted with the conditional generation prompt of :mod:`sc_c2s.prompts` and its sentence is
    sampled token by token (temperature, then top-k, then top-p; see `unique_genes` for repeats and
    `exact_length` for the length) until the sentence's closing period or the end-of-sequence token, within a
    token budget sized from `n_genes` and the tokenizer's tokens per gene.
    Every cell draws from its own seeded random stream, so `random_state` fixes the cells whatever
    `batch_size` (up to floating-point differences between batch shapes on some devices). Cells are written into
    the result batch by batch; a request whose result would not fit in the available memory is refused before
    anything is generated.

    The sentences become expression through :func:`sc_c2s.tl.from_sentences` with the rank fit of `adata` when
    given, else the checkpoint's. Expression is on that fit's scale: ``log10(1 + x)`` of counts normalised to
    the median library size. Put the real data on the same scale before comparing values directly;
    :func:`sc_c2s.tl.score_generation` does that for you.

    Parameters
    ----------
    {doc_adata}
        Optional: cells that went through :func:`sc_c2s.pp.to_sentences` with a rank fit. Their gene words are
        the vocabulary, their rank fit turns positions into expression and the result has their ``var_names``
        in the same order, so ``anndata.concat([adata, generated])`` works; genes of the sentences that are not in
        ``var`` (ranked in ``.raw`` beside highly variable genes in ``var``) stay in the sentences and are left out
        of ``X``, with a warning: pass ``adata.raw.to_adata()`` to keep them. Without `adata`, the checkpoint's
        vocabulary and rank fit are used.
    {doc_model}
    cell_types
        Cell types to generate: a list-like with one entry per cell (``["B cell", "B cell", "NK cell"]``, or an
        array, :class:`~pandas.Series`, :class:`~pandas.Index` or :class:`~pandas.Categorical` of names) or a
        mapping of cell type to number of cells (``{{"B cell": 500, "NK cell": 500}}``; from counts per type,
        ``adata.obs["cell_type"].value_counts().to_dict()``). Numbers are not names: a list-like of them is an
        error. For a model with a label set (``model.metadata.labels``), other types are an error. Pass either
        `cell_types` or `tissues`.
    tissues
        Multi-cell generation (C2S-Scale): a mapping of tissue to number of cells (``{{"lung": 10}}``). Cells are
        written `cells_per_sample` at a time with the tissue-conditioned multi-cell prompt of
        :mod:`sc_c2s.prompts` (the last sample of a tissue takes the rest), and read back block by block
        (``Cell 1:``, ``Cell 2:``, …; a block the model did not write is an empty cell). The whole text is
        sampled until the end-of-sequence token. Where every gene is one token (models trained from scratch),
        `exact_length` holds that token back until the text has as many cells as its prompt asks (each ends with a
        period), whatever their lengths, and `unique_genes` keeps each cell's genes distinct; sub-word tokenizers
        write periods inside gene names (``RP11-34P13.3``), and their texts end where the model ends them. The
        result's ``obs`` holds ``"tissue"`` and ``"sample"`` (cells written together) instead of ``"cell_type"``.
    cells_per_sample
        Cells per multi-cell prompt, with `tissues` only; ``None``: 5 (C2S-Scale trained on 5 to 20), or the
        nearest number of cells per sample the model was trained on (``training["n_cells"]``).
    n_genes
        Genes per sentence to ask for; ``None``: for each cell type, the median of its training cells' sentences
        (``model.metadata.sentence_lengths``, which :func:`sc_c2s.tl.finetune` records), else as many as the model
        was trained on (``model.metadata.n_genes``; 200 for the published checkpoints). Cells expressing fewer
        genes than the sentences hold (targeted panels: 10 to 60 of a few hundred) are thus generated about as
        long as their type's cells, not as the longest cell.
    {doc_organism}
    temperature
        Softmax temperature; below 1 sharpens the distribution of the next token, above 1 flattens it. ``1.0``
        samples the model's own distribution. ``None``: the model's temperature (``model.metadata.temperature``),
        which :func:`sc_c2s.tl.finetune` chooses among 1.0, 0.7 and 0.5 by how close cells generated at each come
        to the training cells, else 1.0. On validation cells (see :doc:`/method`), 0.5 generated cells of
        well-separated types (cell lines, tissues) that were recognised as their type more often, but cells of
        closely related types (PBMC clusters) further from the real ones by MMD.
    top_k
        Sample among this many most likely tokens; ``None`` for no limit.
    top_p
        Sample among the most likely tokens whose probabilities add up to this (nucleus sampling); ``None`` for
        no limit.
    unique_genes
        Write sentences of distinct genes of the vocabulary, since a cell sentence names each gene once: no other
        word (a cell type's name, a word of the prompt) and no gene twice. With one token per gene (the models
        :func:`sc_c2s.tl.finetune` trains from scratch), only the genes' tokens and the end of the sentence can be
        sampled, and a gene's token is blocked once used. With sub-word tokenizers (Pythia's, Gemma's), where a
        gene takes several tokens and a token may start many genes, sentences are written token by token along
        the genes' spellings, each gene at most once; the token budget then suffices for the `n_genes` longest.
        A model trained with nothing between prompt and answer, as the published fine-tuning code joins them
        (``metadata.answer_prefix`` ``""``; detected once where the metadata records none, see :doc:`/method`,
        "Prompts"), writes the first gene in its spelling at the start of an answer, and each gene once in either
        spelling.
    exact_length
        Write `n_genes` words per sentence, as the prompt asks: the closing period and the end-of-sequence token
        are blocked until the sentence has `n_genes` words, and after that only tokens that end the sentence (or
        finish its last word, with sub-word tokenizers) are allowed. A word begins with a token that the
        tokenizer writes after a space; with sub-word tokenizers, a sentence can still come out shorter when the
        token budget runs out. With `unique_genes` and fewer genes than `n_genes`, a sentence holds every gene
        once (with a warning). ``False`` lets the model end the sentence where it likes; models then tend to
        stop early under `top_k` and `top_p`, which cut the long tail of rare genes but not the period.
    random_state
        Seed of the sampling {doc_seed}. Cell ``i`` draws from a stream keyed by the seed and ``i``, so two calls
        with the same seed give the same cells; the seed used is recorded in ``uns["c2s_generate"]["params"]``.
    {doc_batch_size}
    {doc_device}
    {doc_mod}
    client
        A :class:`distributed.Client` to spread the cells over, in chunks; ``None`` uses the active client when
        ``obsm["c2s_genes"]`` of `adata` is a dask array, and runs in this process otherwise. Each worker loads
        the model once, by name or path, on its own GPU where it has one, writes its cells' sentences and turns
        them into expression; the cells are those of a run in one process (see :doc:`/scaling`). With `tissues`,
        the samples are generated in this process (`client` is checked, not used).

    Returns
    -------
    A new AnnData of the generated cells, named ``"generated-0"``, ``"generated-1"``, … in the order of
    `cell_types`, with

    ``X``
        Reconstructed expression, sparse.
    ``var``
        ``adata.var_names`` (with the gene-symbol column used for the sentences, if any), or the checkpoint's
        vocabulary.
    ``obs["cell_type"]``
        The requested type.
    ``obs["c2s_sentence"]``
        The generated sentence, without its closing period.
    ``obs["n_valid_genes"]``, ``obs["n_unknown_words"]``, ``obs["n_duplicate_genes"]``
        Words that are genes of the vocabulary, that are not, and repeats (see :func:`sc_c2s.tl.from_sentences`).
    ``uns["c2s_generate"]["params"]``
        The arguments, the token budget, the rank fit used and the model's provenance.
    ``uns["log1p"]``
        ``{{"base": 10}}``: the scale of ``X``, for scanpy's verbs (as :func:`scanpy.pp.log1p` records its own).

    Raises
    ------
    TypeError
        If `cell_types` is neither a list-like of names nor a mapping of name to count (e.g. a Series of counts).
    ValueError
        If an argument is out of range, a cell type is unknown to a model with a label set, or the result would
        not fit in the available memory (the message says how many cells would).

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)
    >>> generated = sc_c2s.tl.generate(adata, model="demo", cell_types={{"CD14+ Monocyte": 5, "CD19+ B": 5}})
    >>> generated.obs["cell_type"].value_counts().to_dict()
    {{'CD14+ Monocyte': 5, 'CD19+ B': 5}}
    """
    from sc_c2s.models import resolve

    start = logg.info("generating cells")
    random_state = check_sampling(
        n_genes=n_genes,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        random_state=random_state,
        none_for_model=True,
    )
    unique_genes = check_flag(unique_genes, "unique_genes")
    exact_length = check_flag(exact_length, "exact_length")
    check_positive_int(batch_size, "batch_size", none_ok=True)  # before the model loads (or downloads)
    if (cell_types is None) == (tissues is None):
        msg = "Pass either `cell_types` (single cells) or `tissues` (samples of cells of a tissue), not both or none."
        raise ValueError(msg)
    if tissues is None and cells_per_sample is not None:
        msg = "`cells_per_sample` sets how many cells a multi-cell prompt writes; it applies with `tissues=` only."
        raise ValueError(msg)
    if organism is not None:
        prompts.check_organism(organism)  # before the model loads, as the other verbs do
    if tissues is not None:
        from ._generate_tissues import CELLS_PER_SAMPLE, check_tissues, generate_tissues

        # checked before the model loads, which may narrow the default
        check_tissues(tissues, CELLS_PER_SAMPLE if cells_per_sample is None else cells_per_sample)
        _dask.check_client(client)  # as for `cell_types`, though samples are generated in this process
        c2s_model = resolve(model, device=device)
        return generate_tissues(
            adata,
            c2s=c2s_model,
            tissues=tissues,
            cells_per_sample=prompt_cells(cells_per_sample, c2s_model, default=CELLS_PER_SAMPLE),
            n_genes=model_n_genes(c2s_model, n_genes),
            organism=model_organism(c2s_model, organism),
            temperature=model_temperature(c2s_model, temperature),
            top_k=top_k,
            top_p=top_p,
            unique_genes=unique_genes,
            exact_length=exact_length,
            random_state=random_state,
            batch_size=batch_size,
            mod=mod,
            start=start,
        )
    request = _requested_types(cell_types)
    c2s_model = resolve(model, device=device)
    check_task(c2s_model, "cell_type_generation")
    _check_labels(request.types, c2s_model.metadata.labels)
    temperature = model_temperature(c2s_model, temperature)
    organism = model_organism(c2s_model, organism)
    lengths = _type_lengths(c2s_model, request.types, n_genes)
    n_genes = model_n_genes(c2s_model, n_genes)  # the longest a sentence may be, which real cells are compared to
    target = target_of(adata, mod=mod, model=c2s_model)
    # before the type of each cell is written out, which alone can exceed the memory
    check_memory(request.n_cells, n_genes=max(lengths), words=target.words, name="cell_types")
    codes = request.codes()
    X, sentences, counts, written = write_cells(
        c2s_model,
        target,
        [
            prompts.cell_type_generation(t, n_genes=n, organism=organism)
            for t, n in zip(request.types, lengths, strict=True)
        ],
        codes,
        n_genes=max(lengths),
        lengths=lengths,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        unique_genes=unique_genes,
        exact_length=exact_length,
        random_state=random_state,
        batch_size=batch_size,
        distribute=client is not None or (adata is not None and _dask.wanted(adata, mod, client)),
        client=client,
        device=device,
    )
    obs = pd.DataFrame(counts, columns=COUNTS, index=pd.Index([f"generated-{i}" for i in range(len(codes))]))
    obs.insert(0, _keys.GENERATED_CELL_TYPE, pd.Categorical.from_codes(codes, categories=request.types))
    obs.insert(1, _keys.SENTENCE, sentences)
    params = {
        # two lists rather than a mapping: cell types may hold "/", which h5ad keys may not
        "cell_types": list(request.types),
        "n_cells": np.bincount(codes, minlength=len(request.types)).tolist(),
        "n_genes": n_genes,
        "n_genes_by_type": lengths,
        "organism": organism,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        **written,
        "exact_length": exact_length,
        "random_state": random_state,
        "vocabulary": target.source,
        "rank_fit": target.rank_fit,
        **c2s_model.provenance(),
    }
    params = {k: v for k, v in params.items() if v is not None}
    result = AnnData(X, obs=obs, var=target.var, uns={_keys.GENERATE: {"params": params}, _keys.LOG1P: log10_record()})
    logg.info("    finished", time=start, deep=f"generated {result.n_obs} cells; {valid_share(counts)}")
    return result


def _type_lengths(c2s_model: C2SModel, types: list[str], n_genes: int | None) -> list[int]:
    """Genes to ask each cell type for: `n_genes`, or for ``None`` the type's median length in training.

    That is ``metadata.sentence_lengths``, at most the model's `n_genes`, which types without one get (as do all
    types of a model without them: published checkpoints, models trained before they were recorded).
    """
    if n_genes is not None:
        return [n_genes] * len(types)
    most = model_n_genes(c2s_model, None)
    trained = c2s_model.metadata.sentence_lengths or {}
    return [min(trained.get(t, most), most) for t in types]


#: Kinds of :func:`pandas.api.types.infer_dtype` of a list-like of numbers (some of them, for "mixed-integer").
_NUMBERS = frozenset({"integer", "mixed-integer", "floating", "mixed-integer-float", "decimal", "complex", "boolean"})


@dataclass
class _Request:
    """The cells asked for: the distinct cell types in order, and the number of cells of each or the type of each."""

    types: list[str]
    counts: list[int] | None = None
    """Cells per type, for a mapping."""
    cell_codes: np.ndarray | None = None
    """Type of each cell, for a list."""

    @property
    def n_cells(self) -> int:
        return sum(self.counts) if self.counts is not None else len(self.cell_codes)

    def codes(self) -> np.ndarray:
        """Type of each cell, as positions in :attr:`types`."""
        if self.cell_codes is not None:
            return self.cell_codes
        return np.repeat(np.arange(len(self.types), dtype=np.int32), self.counts)


def _requested_types(cell_types: Sequence[str] | Mapping[str, int]) -> _Request:
    """Read the cells asked for, checked: counts are whole numbers, type names one line of text (not numbers, none).

    A list-like of numbers (a :class:`~pandas.Series` of counts from ``value_counts()``, say) is refused rather than
    read as the names ``"8"``, ``"3"``, ….
    """
    list_like = Sequence | np.ndarray | pd.Series | pd.Index | pd.Categorical
    if isinstance(cell_types, str) or not isinstance(cell_types, Mapping | list_like):
        what = f"one string; use [{cell_types!r}]" if isinstance(cell_types, str) else f"a {type(cell_types).__name__}"
        msg = f"`cell_types` must be a list or a mapping of type → count, not {what}."
        raise TypeError(msg)
    names = list(cell_types.keys() if isinstance(cell_types, Mapping) else cell_types)
    n_missing = sum(bool(pd.api.types.is_scalar(t) and pd.isna(t)) for t in names)
    if n_missing:
        msg = (
            f"`cell_types` has {n_missing} missing names (None or NaN), e.g. of cells left unannotated; drop them "
            "(`.dropna()`) or name them."
        )
        raise ValueError(msg)
    if isinstance(cell_types, Mapping):
        bad = {
            t: n for t, n in cell_types.items() if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 0
        }
        if bad:
            msg = f"Counts in `cell_types` must be non-negative integers; got {bad}."
            raise ValueError(msg)
        counts: dict[str, int] = {}
        for t, n in cell_types.items():
            if n:
                counts[str(t)] = counts.get(str(t), 0) + int(n)
        request = _Request(list(counts), counts=list(counts.values()))
    else:
        types = list(cell_types)
        if pd.api.types.infer_dtype(types, skipna=True) in _NUMBERS:
            shown = ", ".join(map(str, types[:3])) + (", …" if len(types) > 3 else "")
            msg = (
                f"`cell_types` holds numbers ({shown}), not cell types. For a number of cells per type, pass a "
                "mapping type → count (e.g. `counts.to_dict()` of `adata.obs[key].value_counts()`); for cell types "
                "stored as numbers, convert them to names with `.astype(str)`."
            )
            raise TypeError(msg)
        codes, uniques = pd.factorize(pd.Series([str(t) for t in types], dtype=object))
        request = _Request(list(uniques), cell_codes=codes.astype(np.int32))
    if not request.n_cells:
        msg = "`cell_types` asks for no cells; pass e.g. ['B cell'] or {'B cell': 100}."
        raise ValueError(msg)
    bad_names = [t for t in request.types if not t.strip() or "\n" in t]
    if bad_names:
        msg = (
            f"`cell_types` has empty or multi-line cell types (e.g. {bad_names[0]!r}); a prompt names one line of text."
        )
        raise ValueError(msg)
    return request


def _check_labels(types: list[str], labels: Sequence[str] | None) -> None:
    """Refuse cell types outside the model's label set, if it has one."""
    unknown = sorted(set(types) - set(labels)) if labels is not None else []
    if unknown:
        msg = f"The model does not know the cell types {unknown}. It was trained on: {sorted(labels)}."
        raise ValueError(msg)
