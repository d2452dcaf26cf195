from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scanpy import logging as logg

from sc_c2s import _keys, prompts
from sc_c2s._data import DataHandler, check_writable, prepare
from sc_c2s._docs import (
    doc_adata,
    doc_batch_size,
    doc_device,
    doc_groups,
    doc_mod,
    doc_model,
    doc_n_cells,
    doc_organism,
    doc_params,
    doc_seed,
)
from sc_c2s._utils._validate import AnyRandom, check_key, check_positive_int
from sc_c2s.models import _runtime
from sc_c2s.models._scratch import join_punctuation

from ._generate_tissues import whole_texts
from ._sampling import check_sampling, sample
from ._utils import (
    check_task,
    drawn_words,
    group_draws,
    groups_of,
    model_n_genes,
    model_organism,
    prompt_cells,
    warn_empty_draws,
)

if TYPE_CHECKING:
    import os

    import torch
    from anndata import AnnData
    from mudata import MuData

    from sc_c2s.models import C2SModel


@doc_params(
    doc_adata=doc_adata,
    doc_model=doc_model,
    doc_groups=doc_groups,
    doc_n_cells=doc_n_cells,
    doc_organism=doc_organism,
    doc_batch_size=doc_batch_size,
    doc_device=doc_device,
    doc_mod=doc_mod,
    doc_seed=doc_seed,
)
def summarize(
    adata: AnnData | MuData,
    *,
    model: C2SModel | str | os.PathLike[str],
    groupby: str,
    n_cells: int | None = None,
    n_genes: int | None = None,
    n_draws: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    organism: prompts.Organism | None = None,
    random_state: AnyRandom = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    key_added: str = _keys.SUMMARY,
    mod: str | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Write a natural-language summary of each group of cells with a C2S model.

    Each group of `groupby` is read through `n_draws` seeded draws of `n_cells` of its cells; each draw fills the
    summary prompt of :mod:`sc_c2s.prompts` (C2S-Scale's ``Abstract summary:``) with their top `n_genes` genes,
    and the model writes the summary, sampled token by token (temperature, then top-k, then top-p, as in
    :func:`sc_c2s.tl.generate`) until the end-of-sequence token or `max_new_tokens`. Every draw samples from
    its own seeded stream, so `random_state` fixes the texts whatever `batch_size`.

    Parameters
    ----------
    {doc_adata}
    {doc_model}
    {doc_groups}
    {doc_n_cells}
    n_genes
        Genes of each cell's sentence in the prompt; ``None``: as many as the model was trained on
        (``model.metadata.n_genes``).
    n_draws
        Draws of `n_cells` cells, hence summaries, per group.
    max_new_tokens
        Most tokens of a summary.
    temperature
        Softmax temperature of sampling.
    top_k
        Sample among this many most likely tokens; ``None`` for no limit.
    top_p
        Sample among the most likely tokens whose probabilities add up to this; ``None`` for no limit.
    {doc_organism}
    random_state
        Seed of the draws and of sampling {doc_seed}.
    {doc_batch_size}
    {doc_device}
    key_added
        Key of ``uns`` for the summaries; the parameters go to ``key_added + "_params"``.
    {doc_mod}
    copy
        Return a copy instead of writing into `adata`.

    Returns
    -------
    ``None``, or a copy of `adata` if ``copy=True``, with

    ``uns[key_added]``
        A DataFrame with one row per group and draw: ``group``, ``draw`` (0, 1, …), ``n_cells`` read and the
        ``summary`` (without its final period).
    ``uns[key_added + "_params"]``
        The arguments, the seed and the model's provenance.

    Examples
    --------
    With `adata` ranked by :func:`sc_c2s.pp.to_sentences` and clustered (``obs["leiden"]``), and `model` a
    checkpoint trained for summaries (a C2S-Scale one, or :func:`sc_c2s.tl.finetune` with ``tasks=["summary"]``):

    >>> import sc_c2s
    >>> sc_c2s.tl.summarize(adata, model=model, groupby="leiden")  # doctest: +SKIP
    >>> adata.uns["c2s_summary"]  # doctest: +SKIP
    """
    from sc_c2s.models import resolve

    start = logg.info("summarising groups of cells with a C2S model")
    handler = DataHandler(adata, mod)
    handler.c2s()
    handler.check_columns(groupby=groupby)
    groups = groups_of(handler, groupby)
    check_positive_int(n_cells, "n_cells", none_ok=True)
    check_positive_int(n_draws, "n_draws")
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(batch_size, "batch_size", none_ok=True)  # before the model loads (or downloads)
    check_key(key_added, "key_added")
    check_writable(adata, copy=copy)
    random_state = check_sampling(
        n_genes=n_genes, temperature=temperature, top_k=top_k, top_p=top_p, random_state=random_state
    )
    if organism is not None:
        prompts.check_organism(organism)
    c2s = resolve(model, device=device)
    check_task(c2s, "summary")
    n_cells = prompt_cells(n_cells, c2s)
    organism = model_organism(c2s, organism)
    n_genes = model_n_genes(c2s, n_genes)
    draws = group_draws(groups, n_cells=n_cells, n_draws=n_draws, random_state=random_state)
    words = drawn_words(adata, c2s, draws, n_genes=n_genes, mod=mod)
    warn_empty_draws(draws, words, results="summaries")
    texts = [
        prompts.summary([words[i] for i in cells], n_genes=n_genes, organism=organism, upper=False)
        for _, cells in draws
    ]
    ids = _runtime.tokenize(c2s.tokenizer, texts)
    batch_size = _runtime.resolve_batch_size(batch_size, c2s.device)
    summaries = np.empty(len(draws), dtype=object)

    def sink(index: np.ndarray, written: list[str]) -> None:
        summaries[index] = [join_punctuation(" ".join(text.split())).removesuffix(".") for text in written]

    sample(
        c2s,
        ids,
        np.arange(len(ids)),
        max_new_tokens=max_new_tokens,
        stop_ids=[_runtime.eos_id(c2s.tokenizer)],
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        gene_ids=None,
        length=None,
        random_state=random_state,
        batch_size=batch_size,
        sink=sink,
        decode=whole_texts,
        cells="n_cells",
    )
    table = pd.DataFrame(
        {
            "group": pd.Categorical([name for name, _ in draws], categories=list(dict.fromkeys(n for n, _ in draws))),
            "draw": np.tile(np.arange(n_draws), len(draws) // n_draws),
            "n_cells": [len(cells) for _, cells in draws],
            "summary": summaries.astype(str),
        }
    )
    params = {
        "groupby": groupby,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_draws": n_draws,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "organism": organism,
        "random_state": random_state,
        **c2s.provenance(),
    }
    results = {
        ("uns", key_added): table,
        ("uns", f"{key_added}_params"): {k: v for k, v in params.items() if v is not None},
    }
    adata = prepare(adata, copy=copy)
    DataHandler(adata, mod).save_all(results, start=start)
    return adata if copy else None
