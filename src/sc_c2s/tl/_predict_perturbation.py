from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from sc_c2s import _keys, prompts
from sc_c2s._data import DataHandler
from sc_c2s._docs import doc_adata, doc_batch_size, doc_device, doc_mod, doc_model, doc_params, doc_seed
from sc_c2s._utils._validate import AnyRandom, check_flag, check_obs_column, check_positive_int
from sc_c2s.models._metadata import PERTURBATION

from ._from_sentences import COUNTS, log10_record
from ._pairs import conditions
from ._sampling import check_memory, check_sampling, target_of, valid_share, write_cells
from ._utils import check_task, in_stable_order, model_n_genes, warn_empty_sentences

if TYPE_CHECKING:
    import os

    import torch
    from mudata import MuData

    from sc_c2s.models._model import C2SModel


@doc_params(
    doc_adata=doc_adata,
    doc_model=doc_model,
    doc_batch_size=doc_batch_size,
    doc_device=doc_device,
    doc_mod=doc_mod,
    doc_seed=doc_seed,
)
def predict_perturbation(
    adata: AnnData | MuData,
    *,
    model: C2SModel | str | os.PathLike[str],
    perturbations: Collection[str],
    condition_key: str,
    control: str,
    groupby: str | None = None,
    n_genes: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    unique_genes: bool = True,
    exact_length: bool = True,
    n_cells: int | None = None,
    random_state: AnyRandom = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    mod: str | None = None,
) -> AnnData:
    """Predict how control cells respond to perturbations with a C2S model, as new cells of expression.

    Each control cell (``obs[condition_key] == control``) of `adata` is prompted, once per perturbation, with its
    top `n_genes` genes in the perturbation prompt of :func:`sc_c2s.prompts.perturbation`, and the model writes
    the perturbed cell's sentence, sampled as in :func:`sc_c2s.tl.generate` (the same `temperature`, `top_k`,
    `top_p`, `unique_genes` and `exact_length`; the temperature is 1.0 unless given: `finetune` chooses one for
    cell-type generation only). The sentences become expression over ``adata.var`` through
    :func:`sc_c2s.tl.from_sentences` with the rank fit of `adata`, as in :func:`~sc_c2s.tl.generate`. Train a model
    for it with :func:`sc_c2s.tl.finetune` and ``tasks=["perturbation"]``; score the result with
    :func:`sc_c2s.tl.score_perturbation`.

    Parameters
    ----------
    {doc_adata}
        Cells that went through :func:`sc_c2s.pp.to_sentences` with a rank fit; only the control cells are read.
    {doc_model}
    perturbations
        Perturbations to apply, as the model was trained to name them (``model.metadata.perturbations``): a list,
        array, Series or Categorical of names.
    condition_key
        Column of ``obs`` with each cell's condition.
    control
        The value of ``obs[condition_key]`` of the control cells.
    groupby
        Column of ``obs`` (e.g. the cell type) copied to each predicted cell from its control cell.
    n_genes
        Genes per control sentence in the prompt, and per predicted sentence; ``None``: as many as the model was
        trained on (``model.metadata.n_genes``), which the prompt states, and each predicted cell as many genes as
        its control cell's sentence holds (up to that many). On whole-transcriptome data the two are the same; on a
        targeted panel, where cells hold 10 to 60 genes, every predicted cell was otherwise as long as the longest
        training sentence.
    temperature
        Softmax temperature of the sampling.
    top_k
        Sample among this many most likely tokens; ``None`` for no limit.
    top_p
        Nucleus sampling threshold; ``None`` for no limit.
    unique_genes
        Write sentences of distinct genes of the vocabulary (see :func:`sc_c2s.tl.generate`).
    exact_length
        Write `n_genes` genes per sentence (see :func:`sc_c2s.tl.generate`).
    n_cells
        Predict from this many control cells, sampled with `random_state`; ``None``: from all of them.
    random_state
        Seed of the sample of control cells and of the sampling {doc_seed}. Predicted cell ``i`` draws from a
        stream keyed by the seed and ``i``.
    {doc_batch_size}
    {doc_device}
    {doc_mod}

    Returns
    -------
    A new AnnData of the predicted cells, one per control cell and perturbation (perturbation by perturbation),
    named ``"{{control cell}}-{{perturbation}}"``, with

    ``X``
        Reconstructed expression over ``adata.var_names``, sparse, on the rank fit's scale.
    ``obs["c2s_source_cell"]``
        The control cell it was predicted from.
    ``obs[groupby]``
        That cell's group, with `groupby`.
    ``obs[condition_key]``
        The perturbation.
    ``obs["c2s_sentence"]``, ``obs["n_valid_genes"]``, ``obs["n_unknown_words"]``, ``obs["n_duplicate_genes"]``
        The predicted sentence and its validity counts, as from :func:`~sc_c2s.tl.generate`.
    ``uns["c2s_predict_perturbation"]["params"]``
        The arguments, the token budget, the rank fit and the model's provenance; ``lengths`` says what each
        predicted cell was asked for: ``"control"``, its control cell's length, or ``"n_genes"``.
    ``uns["log1p"]``
        ``{{"base": 10}}``: the scale of ``X``, for scanpy's verbs (as :func:`scanpy.pp.log1p` records its own).

    Raises
    ------
    ValueError
        If `groupby` is `condition_key`, or either is the name of another column of the result's ``obs``.

    Warns
    -----
    UserWarning
        If some control cells have empty sentences (they express no gene): their predicted cells are guesses from
        the prompt alone.

    Examples
    --------
    >>> import anndata as ad
    >>> import sc_c2s
    >>> adata = ad.read_h5ad("kang.h5ad")  # doctest: +SKIP
    >>> sc_c2s.pp.to_sentences(adata)  # doctest: +SKIP
    >>> path = sc_c2s.tl.finetune(
    ...     adata,
    ...     base_model="scratch",
    ...     output_dir="kang_model",
    ...     tasks=["perturbation"],
    ...     condition_key="condition",
    ...     control="control",
    ...     pair_by="cell_type",
    ... )  # doctest: +SKIP
    >>> predicted = sc_c2s.tl.predict_perturbation(
    ...     adata,
    ...     model=path,
    ...     perturbations=["stimulated"],
    ...     condition_key="condition",
    ...     control="control",
    ...     groupby="cell_type",
    ... )  # doctest: +SKIP
    """
    from sc_c2s.models import resolve

    start = logg.info("predicting perturbed cells")
    random_state = check_sampling(
        n_genes=n_genes, temperature=temperature, top_k=top_k, top_p=top_p, random_state=random_state
    )
    unique_genes = check_flag(unique_genes, "unique_genes")
    exact_length = check_flag(exact_length, "exact_length")
    check_positive_int(n_cells, "n_cells", none_ok=True)
    check_positive_int(batch_size, "batch_size", none_ok=True)  # before the model loads (or downloads)
    _check_columns(condition_key=condition_key, groupby=groupby)
    perturbations = _perturbations(perturbations)
    handler = DataHandler(adata, mod)
    handler.check_columns(condition_key=condition_key, groupby=groupby)
    values = conditions(handler.obs, condition_key=condition_key, control=control)
    groups = None if groupby is None else check_obs_column(handler.obs, groupby, arg="groupby")
    cells = np.flatnonzero((values == str(control)).to_numpy())
    if n_cells is not None and n_cells < len(cells):
        cells = np.sort(np.random.default_rng(random_state).choice(cells, n_cells, replace=False))
    source_names = handler.obs_names[cells]
    if not source_names.is_unique:
        logg.warning(
            f"{source_names[source_names.duplicated()].nunique()} obs_names are shared by several control cells: "
            f"the names of the cells predicted from them and their obs[{_keys.SOURCE_CELL!r}] will not tell them "
            "apart; make them unique first (`adata.obs_names_make_unique()`)"
        )
    c2s_model = resolve(model, device=device)
    _check_model(c2s_model, perturbations)
    lengths_of = "n_genes" if n_genes is not None else "control"
    n_genes = model_n_genes(c2s_model, n_genes)
    target = target_of(adata, mod=mod, model=c2s_model)
    check_memory(len(cells) * len(perturbations), n_genes=n_genes, words=target.words, name="n_cells")
    words = prompts.sentence_words(adata, n_genes=n_genes, mod=mod)
    warn_empty_sentences(
        sum(not words[c] for c in cells), cells="control cells", results="the cells predicted from them"
    )
    upper = c2s_model.metadata.upper_case
    texts = [
        prompts.perturbation(words[c], perturbation_name=p, n_genes=n_genes, upper=upper)
        for p in perturbations
        for c in cells
    ]
    X, sentences, counts, written = write_cells(
        c2s_model,
        target,
        texts,
        np.arange(len(texts)),
        n_genes=n_genes,
        lengths=[len(words[c]) or n_genes for _ in perturbations for c in cells] if lengths_of == "control" else None,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        unique_genes=unique_genes,
        exact_length=exact_length,
        random_state=random_state,
        batch_size=batch_size,
    )
    source = np.tile(handler.obs_names[cells].to_numpy(), len(perturbations))
    names = np.repeat(perturbations, len(cells))
    obs = pd.DataFrame(counts, columns=COUNTS, index=pd.Index([f"{c}-{p}" for c, p in zip(source, names, strict=True)]))
    obs.insert(0, _keys.SOURCE_CELL, source)
    if groups is not None:
        obs.insert(1, groupby, pd.Categorical(np.tile(groups.to_numpy()[cells], len(perturbations))))
    obs.insert(len(obs.columns) - len(COUNTS), condition_key, pd.Categorical(names, categories=perturbations))
    obs.insert(len(obs.columns) - len(COUNTS), _keys.SENTENCE, sentences)
    params = {
        "perturbations": perturbations,
        "condition_key": condition_key,
        "control": control,
        "groupby": groupby,
        "n_genes": n_genes,
        "lengths": lengths_of,
        "n_cells": n_cells,
        "n_control_cells": len(cells),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        **written,
        "exact_length": exact_length,
        "random_state": random_state,
        "rank_fit": target.rank_fit,
        **c2s_model.provenance(),
    }
    result = AnnData(
        X,
        obs=obs,
        var=target.var,
        uns={
            _keys.PREDICT_PERTURBATION: {"params": {k: v for k, v in params.items() if v is not None}},
            _keys.LOG1P: log10_record(),
        },
    )
    logg.info("    finished", time=start, deep=f"predicted {result.n_obs} cells; {valid_share(counts)}")
    return result


def _check_columns(*, condition_key: str, groupby: str | None) -> None:
    """Refuse a `condition_key` or `groupby` that would name two columns of the predicted cells' ``obs`` alike."""
    own = [_keys.SOURCE_CELL, _keys.SENTENCE, *COUNTS]
    for name, key in (("condition_key", condition_key), ("groupby", groupby)):
        if key in own:
            msg = (
                f"`{name}={key!r}` is the name of a column that the predicted cells' obs holds for itself ({own}); "
                "copy that column of `adata.obs` under another name and pass that one."
            )
            raise ValueError(msg)
    if groupby is not None and groupby == condition_key:
        msg = (
            f"`groupby` must differ from `condition_key` ({condition_key!r}): the predicted cells hold their "
            f"perturbation in obs[{condition_key!r}], beside the group of their control cell; pass another `groupby`, "
            "or none."
        )
        raise ValueError(msg)


def _perturbations(perturbations: Collection[str]) -> list[str]:
    """Return the perturbations as a list of distinct strings, checked: a non-empty list-like of one-line names."""
    if isinstance(perturbations, str) or not pd.api.types.is_list_like(perturbations):
        msg = f"`perturbations` must be a list of names, e.g. [{perturbations!r}]."
        raise TypeError(msg)
    names = list(dict.fromkeys(str(p) for p in in_stable_order(perturbations)))
    bad = [p for p in names if not p.strip() or "\n" in p]
    if not names or bad:
        msg = f"`perturbations` must be a non-empty list of one-line names, got {list(perturbations)!r}."
        raise ValueError(msg)
    return names


def _check_model(c2s_model: C2SModel, perturbations: list[str]) -> None:
    """Refuse perturbations the model was not trained on; warn about a model not trained for the task."""
    metadata = c2s_model.metadata
    check_task(c2s_model, PERTURBATION)
    known = metadata.perturbations
    unknown = sorted(set(perturbations) - set(known)) if known is not None else []
    if unknown:
        msg = f"The model does not know the perturbations {unknown}. It was trained on: {sorted(known)}."
        raise ValueError(msg)
