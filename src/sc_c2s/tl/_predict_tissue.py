from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

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
from sc_c2s._utils._validate import AnyRandom, check_key, check_positive_int, check_random_state
from sc_c2s.models import _runtime

from ._annotate import MAX_ANSWER_TOKENS, generate_answers, label_set, score_labels
from ._utils import (
    check_task,
    drawn_words,
    free_labels,
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
def predict_tissue(
    adata: AnnData | MuData,
    *,
    model: C2SModel | str | os.PathLike[str],
    groupby: str,
    labels: Sequence[str] | Literal["model"] | None = None,
    n_cells: int | None = None,
    n_genes: int | None = None,
    n_draws: int = 5,
    organism: prompts.Organism | None = None,
    random_state: AnyRandom = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    key_added: str = _keys.TISSUE,
    mod: str | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Predict the tissue of each group of cells (a sample, donor or cluster) with a C2S model.

    Each group of `groupby` is read through `n_draws` seeded draws of `n_cells` of its cells; each draw fills the
    tissue prediction prompt of :mod:`sc_c2s.prompts` (C2S-Scale's multi-cell format) with their top `n_genes`
    genes. Two modes, as in :func:`sc_c2s.tl.annotate`:

    free (``labels=None``)
        The model writes each draw's answer greedily; the group's tissue is the most frequent answer of its
        draws (ties: the first drawn), its score the share of draws that gave it. Answers that are lists of
        genes rather than a tissue (a failure of some published checkpoints) are missing, and counted in a
        warning, unless they are tissues of the model (``model.metadata.tissues``), which are also read past a
        period of their own, as :func:`~sc_c2s.tl.annotate` reads its labels.
    constrained (``labels=[...]`` or ``"model"``)
        Each draw scores the log-likelihood of every label's answer; the group's tissue is the label with the
        largest mean over its draws, its score that label's softmax probability of the means. The mean, not the
        sum, so that the score does not grow with `n_draws`: the draws of a group of no more than `n_cells`
        cells hold the same cells, only in another order.

    Parameters
    ----------
    {doc_adata}
    {doc_model}
    {doc_groups}
    labels
        Candidate tissues for constrained prediction, ``"model"`` for the tissues the checkpoint was trained on
        (``model.metadata.tissues``), or ``None`` to let the model write them.
    {doc_n_cells}
    n_genes
        Genes of each cell's sentence in the prompt; ``None``: as many as the model was trained on
        (``model.metadata.n_genes``).
    n_draws
        Draws of `n_cells` cells per group.
    {doc_organism}
    random_state
        Seed of the draws {doc_seed}.
    {doc_batch_size}
    {doc_device}
    key_added
        Column of ``obs`` for the tissues; the score goes to ``key_added + "_score"``.
    {doc_mod}
    copy
        Return a copy instead of writing into `adata`.

    Returns
    -------
    ``None``, or a copy of `adata` if ``copy=True``, with

    ``obs[key_added]``
        Categorical: the tissue of each cell's group (missing for cells without a group, and in free mode for
        groups whose every answer was a gene list); its categories are the tissues given to at least one group, sorted.
    ``obs[key_added + "_score"]``
        The score of that tissue (see above).
    ``uns[key_added]``
        ``"groups"``: a DataFrame indexed by group with its ``tissue``, ``score`` and ``n_cells``; ``"draws"``:
        a DataFrame with the ``group``, ``answer`` and ``score`` of every draw (in constrained mode, the draw's
        best label and its softmax probability); ``"params"``: the arguments, the seed and the model's
        provenance.

    Examples
    --------
    With `adata` ranked by :func:`sc_c2s.pp.to_sentences`, each cell's sample in ``obs["sample"]``, and `model` a
    checkpoint trained for tissue prediction (a C2S-Scale one, or :func:`sc_c2s.tl.finetune` with
    ``tasks=["tissue_prediction"]``):

    >>> import sc_c2s
    >>> sc_c2s.tl.predict_tissue(adata, model=model, groupby="sample", labels=["lung", "kidney"])  # doctest: +SKIP
    >>> adata.uns["c2s_tissue"]["groups"]  # doctest: +SKIP
    """
    from sc_c2s.models import resolve

    start = logg.info("predicting tissues of groups of cells with a C2S model")
    handler = DataHandler(adata, mod)
    genes = handler.c2s()["genes"]
    handler.check_columns(groupby=groupby)
    groups = groups_of(handler, groupby)
    check_positive_int(n_cells, "n_cells", none_ok=True)
    check_positive_int(batch_size, "batch_size", none_ok=True)  # before the model loads (or downloads)
    check_positive_int(n_genes, "n_genes", none_ok=True)
    check_positive_int(n_draws, "n_draws")
    check_key(key_added, "key_added")
    if groupby in (key_added, f"{key_added}_score"):
        msg = (
            f"`key_added={key_added!r}` would write the tissues over obs[{groupby!r}], the groups they are predicted "
            "for; pass another `key_added`."
        )
        raise ValueError(msg)
    check_writable(adata, copy=copy)
    candidates = None if labels is None else label_set(labels)
    random_state = check_random_state(random_state)
    if organism is not None:
        prompts.check_organism(organism)
    c2s = resolve(model, device=device)
    check_task(c2s, "tissue_prediction")
    n_cells = prompt_cells(n_cells, c2s)
    if candidates == "model":
        candidates = _model_tissues(c2s)  # checked when trained, by the rules of then
    organism = model_organism(c2s, organism)
    n_genes = model_n_genes(c2s, n_genes)
    draws = group_draws(groups, n_cells=n_cells, n_draws=n_draws, random_state=random_state)
    words = drawn_words(adata, c2s, draws, n_genes=n_genes, mod=mod)
    warn_empty_draws(draws, words, results="tissues")
    texts = [
        prompts.tissue_prediction([words[i] for i in cells], n_genes=n_genes, organism=organism, upper=False)
        for _, cells in draws
    ]
    ids = _runtime.tokenize(c2s.tokenizer, texts)
    batch_size = _runtime.resolve_batch_size(batch_size, c2s.device)
    draw_groups = np.array([name for name, _ in draws], dtype=object)
    if candidates is None:
        _runtime.check_context(c2s.model, ids, name=c2s.name, room=MAX_ANSWER_TOKENS, cells="n_cells")
        table, per_draw = _majority(c2s, ids, draw_groups, batch_size=batch_size, genes=genes)
    else:
        table, per_draw = _averaged(c2s, ids, draw_groups, candidates, batch_size=batch_size)
    names = groups.astype(str).where(groups.notna())
    table["n_cells"] = names.value_counts().reindex(table.index).to_numpy()
    codes = table.index.get_indexer(names)  # -1: no group
    categories = sorted(table["tissue"].dropna().unique())  # those given: scanpy's `groupby` plots need each one
    tissue = pd.Categorical(
        pd.Series(table["tissue"].to_numpy()[codes], dtype=object).where(codes >= 0), categories=categories
    )
    score = np.where(codes >= 0, table["score"].to_numpy()[codes], np.nan)
    params = {
        "mode": "free" if candidates is None else "constrained",
        "groupby": groupby,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_draws": n_draws,
        "organism": organism,
        "random_state": random_state,
        **({"labels": candidates} if candidates is not None else {}),
        **c2s.provenance(),
    }
    table["tissue"] = pd.Categorical(table["tissue"], categories=categories)
    results = {
        ("obs", key_added): tissue,
        ("obs", f"{key_added}_score"): score,
        ("uns", key_added): {"groups": table, "draws": per_draw, "params": params},
    }
    adata = prepare(adata, copy=copy)
    DataHandler(adata, mod).save_all(results, start=start)
    return adata if copy else None


def _majority(
    c2s: C2SModel, ids: list[list[int]], draw_groups: np.ndarray, *, batch_size: int | None, genes: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Free answers of each draw; per group the most frequent one and the share of draws that gave it."""
    known = c2s.metadata.tissues
    answers, prob = generate_answers(c2s, ids, known=known, batch_size=batch_size, desc="predicting tissues")
    named = free_labels(answers, genes, vocabulary=c2s.metadata.vocabulary, known=known, what="tissues", stacklevel=4)
    answers = pd.Series(named, dtype=object)
    per_draw = pd.DataFrame({"group": draw_groups, "answer": answers.to_numpy(), "score": prob})
    rows = {}
    for group, draws in per_draw.groupby("group", sort=False):
        counts = draws["answer"].value_counts(sort=False)  # in order of first appearance
        rows[group] = (counts.idxmax(), counts.max() / len(draws)) if len(counts) else (None, np.nan)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["tissue", "score"])
    per_draw["group"] = pd.Categorical(per_draw["group"], categories=table.index)
    per_draw["answer"] = per_draw["answer"].astype("category")
    return table, per_draw


def _averaged(
    c2s: C2SModel, ids: list[list[int]], draw_groups: np.ndarray, labels: list[str], *, batch_size: int | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Label log-likelihoods of each draw; per group the label of the largest mean and its softmax probability."""
    from scipy.special import softmax

    loglik = score_labels(c2s, ids, labels, batch_size=batch_size, desc="predicting tissues", cells="n_cells")
    names = pd.unique(draw_groups)
    codes = pd.Index(names).get_indexer(draw_groups)
    mean = np.zeros((len(names), len(labels)))
    np.add.at(mean, codes, loglik)
    mean /= np.bincount(codes, minlength=len(names))[:, None]
    best, prob = mean.argmax(axis=1), softmax(mean, axis=1)
    table = pd.DataFrame(
        {"tissue": np.asarray(labels, dtype=object)[best], "score": prob[np.arange(len(best)), best]},
        index=pd.Index(names, dtype=object),
    )
    draw_best = loglik.argmax(axis=1)
    per_draw = pd.DataFrame(
        {
            "group": pd.Categorical(draw_groups, categories=names),
            "answer": pd.Categorical.from_codes(draw_best, categories=labels),
            "score": softmax(loglik, axis=1)[np.arange(len(draw_best)), draw_best],
        }
    )
    return table, per_draw


def _model_tissues(c2s: C2SModel) -> list[str]:
    """Return the tissues the checkpoint was trained on, or a clear error if its metadata has none."""
    if not c2s.metadata.tissues:
        msg = (
            f'`labels="model"`, but {c2s.name!r} carries no tissues in its metadata; pass `labels=[...]` with the '
            "candidate tissues, or `labels=None` to let the model write them."
        )
        raise ValueError(msg)
    return list(c2s.metadata.tissues)
