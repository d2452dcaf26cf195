from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scanpy import logging as logg

from sc_c2s import _dask, _keys, prompts
from sc_c2s._data import DataHandler, check_writable, prepare
from sc_c2s._docs import doc_adata, doc_batch_size, doc_client, doc_device, doc_mod, doc_model, doc_params
from sc_c2s._utils._validate import check_key, check_positive_int
from sc_c2s.models import _runtime

from ._utils import REMOVE_EMPTY, cell_words, model_n_genes, prediction_prompts

if TYPE_CHECKING:
    import os

    import torch
    from anndata import AnnData
    from distributed import Client
    from mudata import MuData

    from sc_c2s.models import C2SModel


@doc_params(
    doc_adata=doc_adata,
    doc_model=doc_model,
    doc_batch_size=doc_batch_size,
    doc_device=doc_device,
    doc_mod=doc_mod,
    doc_client=doc_client,
)
def embed(
    adata: AnnData | MuData,
    *,
    model: C2SModel | str | os.PathLike[str],
    key_added: str = _keys.EMBEDDING,
    n_genes: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    mod: str | None = None,
    client: Client | None = None,
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
        Genes of each cell's sentence in the prompt; ``None``: as many as the model was trained on
        (``model.metadata.n_genes``; 200 for the published checkpoints).
    {doc_batch_size}
    {doc_device}
    {doc_mod}
    {doc_client}
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
    check_positive_int(batch_size, "batch_size", none_ok=True)  # before the model loads (or downloads)
    check_writable(adata, copy=copy)
    if _dask.wanted(adata, mod, client):
        return _dask.map_verb(
            embed,
            adata,
            model=model,
            device=device,
            mod=mod,
            client=client,
            copy=copy,
            start=start,
            key_added=key_added,
            n_genes=n_genes,
            batch_size=batch_size,
        )
    c2s = resolve(model, device=device)
    organism = prompts.check_organism(c2s.metadata.organism)
    n_genes = model_n_genes(c2s, n_genes)
    words = cell_words(adata, c2s, n_genes=n_genes, mod=mod)
    n_empty = sum(not cell for cell in words)
    if n_empty:
        msg = f"{n_empty} cells have empty sentences (they express no gene), so they have no embedding; {REMOVE_EMPTY}"
        raise ValueError(msg)
    ids, spans = sentence_tokens(c2s, words, n_genes=n_genes, organism=organism)
    _runtime.check_context(c2s.model, ids, name=c2s.name)

    pad = _runtime.pad_id(c2s.tokenizer)
    batch_size = _runtime.resolve_batch_size(batch_size, c2s.device)
    embedding = np.empty((len(ids), c2s.model.config.hidden_size), dtype=np.float32)

    def embed_batch(batch: _runtime.Batch) -> None:
        embedding[batch.index] = _runtime.mean_hidden_state(c2s.model, batch, spans[batch.index])

    with _runtime.inference(c2s.model):
        _runtime.run_batches(c2s.model, ids, embed_batch, batch_size=batch_size, pad_id=pad, desc="embedding")

    params = {"n_genes": n_genes, "organism": organism, **c2s.provenance()}
    results = {("obsm", key_added): embedding, ("uns", key_added): {"params": params}}
    adata = prepare(adata, copy=copy)
    DataHandler(adata, mod).save_all(results, start=start)
    return adata if copy else None


def sentence_tokens(
    c2s: C2SModel, words: Sequence[Sequence[str]], *, n_genes: int, organism: str
) -> tuple[list[list[int]], np.ndarray]:
    """Tokenise each cell's prediction prompt, and find the tokens of its cell sentence (cells × 2: start, end).

    The tokens are those that cover a character of the sentence, found from the tokenizer's character offsets.
    Tokenizers such as Gemma's merge across words (a gene's last letters and the period after the sentence can
    be one token); such a token belongs to the sentence.
    """
    before = prompts.CELL_TYPE_PREDICTION.split("{cell_sentence}")[0]
    texts = prediction_prompts(words, n_genes=n_genes, organism=organism)
    starts = np.full(len(words), len(before.format(num_genes=n_genes, organism=organism)))
    ends = starts + np.array([len(prompts.cell_sentence(cell, upper=False)) for cell in words])
    return _runtime.tokenize_spans(c2s.tokenizer, texts, np.stack([starts, ends], axis=1))
