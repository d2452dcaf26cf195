from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scanpy import logging as logg

from sc_c2s import _keys, prompts
from sc_c2s._data import DataHandler, prepare
from sc_c2s._docs import doc_adata, doc_batch_size, doc_device, doc_mod, doc_model, doc_params
from sc_c2s._utils._validate import check_key
from sc_c2s.models import _runtime

from ._utils import cell_words, prediction_prompts

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData

    from sc_c2s.models import C2SModel


@doc_params(
    doc_adata=doc_adata, doc_model=doc_model, doc_batch_size=doc_batch_size, doc_device=doc_device, doc_mod=doc_mod
)
def embed(
    adata: AnnData | MuData,
    *,
    model: C2SModel | str,
    key_added: str = _keys.EMBEDDING,
    n_genes: int = 200,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    mod: str | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Embed each cell with a C2S model: its last hidden layer averaged over the cell sentence.

    The model reads the cell-type prediction prompt of :mod:`sc_c2s.prompts` with the cell's top `n_genes`
    genes (organism and casing from the model's metadata). The embedding is the mean of the final hidden states
    (after the last layer norm) over the tokens of the cell sentence only: the template text around it and the
    padding are left out. Cells are batched by token length with left padding; the result does not depend on
    `batch_size` (up to floating-point rounding).

    Parameters
    ----------
    {doc_adata}
    {doc_model}
    key_added
        Key of ``obsm`` for the embedding, and of ``uns`` for its parameters.
    n_genes
        Genes of each cell's sentence in the prompt (the published checkpoints read 200).
    {doc_batch_size}
    {doc_device}
    {doc_mod}
    copy
        Return a copy instead of writing into `adata`.

    Returns
    -------
    ``None``, or a copy of `adata` if ``copy=True``, with

    ``obsm[key_added]``
        float32 array of cells × hidden size, e.g. for ``sc.pp.neighbors(adata, use_rep=key_added)``.
    ``uns[key_added]["params"]``
        ``n_genes``, ``organism`` and the model's provenance: ``model`` name, ``path``, ``revision``, ``sha256``
        of its files.

    Raises
    ------
    KeyError
        If :func:`sc_c2s.pp.to_sentences` has not been run on `adata`.
    ValueError
        If some cells have empty sentences (they express no gene): remove them first, e.g. with
        ``sc.pp.filter_cells(adata, min_genes=1)``.

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)
    >>> sc_c2s.tl.embed(adata, model="demo")  # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_c2s")  # doctest: +SKIP
    """
    from sc_c2s.models import resolve

    start = logg.info("embedding cells with a C2S model")
    DataHandler(adata, mod).c2s()
    check_key(key_added, "key_added")
    c2s = resolve(model, device=device)
    organism = prompts.check_organism(c2s.metadata.organism)
    words = cell_words(adata, c2s, n_genes=n_genes, mod=mod)
    n_empty = sum(not cell for cell in words)
    if n_empty:
        msg = (
            f"{n_empty} cells have empty sentences (they express no gene), so they have no embedding; remove them "
            "first, e.g. with `sc.pp.filter_cells(adata, min_genes=1)`."
        )
        raise ValueError(msg)
    ids = _runtime.tokenize(c2s.tokenizer, prediction_prompts(words, organism=organism))
    _runtime.check_context(c2s.model, ids, name=c2s.name)
    spans = sentence_spans(c2s, ids, words, organism=organism)

    pad = _runtime.pad_id(c2s.tokenizer)
    batch_size = _runtime.resolve_batch_size(batch_size, c2s.device)
    embedding = np.empty((len(ids), c2s.model.config.hidden_size), dtype=np.float32)
    with _runtime.inference(c2s.model):
        for batch in _runtime.batches(ids, batch_size=batch_size, pad_id=pad, device=c2s.device, desc="embedding"):
            embedding[batch.index] = _runtime.mean_hidden_state(c2s.model, batch, spans[batch.index])

    params = {"n_genes": n_genes, "organism": organism, **c2s.provenance()}
    results = {("obsm", key_added): embedding, ("uns", key_added): {"params": params}}
    adata = prepare(adata, copy=copy)
    DataHandler(adata, mod).save_all(results, start=start)
    return adata if copy else None


def sentence_spans(
    c2s: C2SModel, ids: Sequence[Sequence[int]], words: Sequence[Sequence[str]], *, organism: str
) -> np.ndarray:
    """Start and end (exclusive) of the cell sentence's tokens in each tokenised prompt, cells × 2.

    The template text before the sentence (which depends on the number of genes) and after it is tokenised on
    its own; the sentence is what lies between. A tokenizer that merges tokens across these boundaries is
    refused, since the span would then be wrong.
    """
    before, after = prompts.CELL_TYPE_PREDICTION.split("{cell_sentence}")
    n_words = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    prefixes = {
        n: _runtime.tokenize(c2s.tokenizer, [before.format(num_genes=n, organism=organism).rstrip()])[0]
        for n in np.unique(n_words)
    }
    suffix = _runtime.tokenize(c2s.tokenizer, [after], special_tokens=False)[0]
    spans = np.empty((len(ids), 2), dtype=np.int64)
    for i, (seq, n) in enumerate(zip(ids, n_words, strict=True)):
        prefix = prefixes[n]
        spans[i] = len(prefix), len(seq) - len(suffix)
        if list(seq[: len(prefix)]) != prefix or list(seq[spans[i, 1] :]) != suffix or spans[i, 0] >= spans[i, 1]:
            msg = (
                f"Cannot find the cell sentence among the prompt tokens of cell {i}: the tokenizer of {c2s.name!r} "
                "merges the sentence with the template text around it."
            )
            raise ValueError(msg)
    return spans
