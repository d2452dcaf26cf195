from __future__ import annotations

import os
import shutil
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from contextlib import suppress
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from sc_c2s import _keys, prompts
from sc_c2s._compat import enable_activation_checkpointing
from sc_c2s._data import DataHandler
from sc_c2s._docs import doc_adata, doc_mod, doc_organism, doc_params, doc_seed
from sc_c2s._rank_model import RankFit
from sc_c2s._utils._validate import (
    AnyRandom,
    check_flag,
    check_number,
    check_positive_int,
    check_random_state,
)
from sc_c2s.models import _candidates, _files, _lora, _runtime, _trainer
from sc_c2s.models._load import check_name_or_path
from sc_c2s.models._metadata import MULTI_CELL_TASKS, PERTURBATION, SINGLE_CELL_TASKS, TASKS, C2SMetadata

from . import _pairs, _samples
from ._annotate import check_labels, label_loglik
from ._calibration import fit_temperature
from ._sampling import check_room, most_that_fit, new_tokens, token_budget
from ._temperature import choose_temperature
from ._utils import cell_words, model_organism

if TYPE_CHECKING:
    import torch
    from mudata import MuData

    from sc_c2s.models._model import C2SModel

#: ``base_model`` value that trains a small model from nothing.
SCRATCH = "scratch"
#: Defaults of the training parameters: (from scratch, from a pretrained checkpoint).
_BATCH_SIZE = (16, 8)
_LEARNING_RATE = (2e-3, 5e-5)
#: Peak learning rate of a LoRA adapter.
_LORA_LEARNING_RATE = 2e-4
#: Fewest held-out cells (in all) to select the model on; fewer are announced as noise.
MIN_EVAL_CELLS = 10
#: Most held-out cells annotated after training for the checkpoint's scores and calibration (drawn per label).
MAX_SCORED_CELLS = 5000


@doc_params(doc_adata=doc_adata, doc_mod=doc_mod, doc_organism=doc_organism, doc_seed=doc_seed)
def finetune(
    adata: AnnData | MuData,
    *,
    label_key: str | None = None,
    base_model: str | Path,
    output_dir: str | Path,
    tasks: Sequence[str] = SINGLE_CELL_TASKS,
    tissue_key: str | None = None,
    groupby: str | None = None,
    summaries: Mapping[Hashable, str] | str | None = None,
    n_cells: tuple[int, int] = (5, 20),
    paraphrase: bool = False,
    n_genes: int = 200,
    organism: prompts.Organism | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    patience: int | None = 4,
    eval_every: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    gene_dropout: float = 0.0,
    balance_labels: float = 0.0,
    eval_fraction: float = 0.1,
    random_state: AnyRandom = 0,
    device: str | torch.device | None = None,
    adapter: Literal["lora"] | None = None,
    lora_rank: int = 16,
    target_modules: Sequence[str] | None = None,
    quantization: Literal["4bit"] | None = None,
    gradient_checkpointing: bool | None = None,
    condition_key: str | None = None,
    control: str | None = None,
    pair_by: str | Sequence[str] | None = None,
    mod: str | None = None,
) -> Path:
    """Train a C2S model on the cell sentences and labels of `adata`, and write it as a checkpoint.

    Each cell gives one training sample per task in the prompt format of :mod:`sc_c2s.prompts`: its cell
    sentence followed by its label (``"cell_type_prediction"``), or its label followed by its cell sentence
    (``"cell_type_generation"``). The loss covers the answer and the end-of-sequence token only. Sentences of
    `n_genes` genes that the base model's context cannot hold, as annotation, generation and perturbation
    prediction will read and write them, are refused before training, naming the most genes that fit; a multi-cell
    sample longer than the context keeps fewer genes of each cell, never any of its answer.

    A share `eval_fraction` of the cells, drawn per label with `random_state`, is held out and selects the model: every
    `eval_every` steps each held-out cell is scored under every training label (for prediction, each label's answer
    after the cell's prompt, read once, as constrained :func:`sc_c2s.tl.annotate` scores it; for generation, its
    sentence as answer after each label's prompt), and a task's label accuracy is the share of cells whose true label
    fits best (highest log-likelihood, lowest answer loss). The weights with the best mean label accuracy over tasks
    (the latest among equals) are kept, training stops after `patience` evaluations below the best, and the best weights
    are the ones saved. The answer loss is not the criterion: for generation it rises while the model learns what sets
    the cell types apart (see :doc:`/method`). The curve (step, seconds, answer loss and label accuracy per task) goes
    into the checkpoint's metadata (``training["curve"]``, ``training["best_step"]``, ``training["stopped"]``). After
    training, a model trained for ``"cell_type_prediction"`` annotates the held-out cells (at most about 5,000, each
    label's share drawn with `random_state`) with :func:`sc_c2s.tl.annotate` constrained to the training labels, with
    its defaults (re-ranked by the generation task where both tasks were trained), and the accuracy and macro-F1 go into
    the metadata (``scores``, with ``rerank``, the labels re-ranked per cell; empty for a model not trained to annotate)
    beside the held-out cells' names. The same reading fits the temperatures that calibrate annotation's scores, for the
    prediction alone and re-ranked (``score_temperatures``: each minimises the negative log-likelihood of the held-out
    cells' labels, and is at least 1). A model trained for ``"cell_type_generation"`` records the median genes per
    sentence of each label's training cells (``sentence_lengths``, which :func:`sc_c2s.tl.generate` asks each type for),
    then generates 200 cells as :func:`sc_c2s.tl.generate` does by default at each of the temperatures 1.0, 0.7 and 0.5
    (20 to 40 s on a CPU for models from scratch) and keeps the one whose cells come closest to the cells of `adata` by
    MMD (:func:`sc_c2s.tl.score_generation`) as ``metadata.temperature``, the temperature :func:`sc_c2s.tl.generate`
    samples at with it by default: a lower one suits well-separated types (cell lines), the model's own distribution
    closely related ones (see :doc:`/method`).

    The budget: from scratch, 2,400 optimiser steps of 16 samples whatever the number of cells (the learning
    rate decays over them; generation needs that many even for a few hundred cells, and they take about 9
    minutes on 2 CPU cores); a pretrained model gets 3 passes over the training samples. `epochs` and
    `max_steps` replace that maximum (the smaller of the two where both are given: ``max_steps=5000`` trains
    longer), `max_time` bounds the wall time, and early stopping can end training before it. The progress bar
    shows the latest and best held-out label accuracy and the time left.

    With ``base_model="scratch"`` the model is a small GPT-NeoX (the Pythia architecture) with one token per
    gene, label word and template word, sized to the data: a few thousand cells train in minutes on a CPU. Any
    other value is loaded with :func:`sc_c2s.models.load` and fine-tuned. Training runs in float32, with bf16
    autocast on a GPU.

    With ``adapter="lora"`` the base model's weights stay frozen (in bfloat16 on a GPU) and a LoRA adapter of
    rank `lora_rank` is trained on its attention and MLP projections, as C2S-Scale fine-tunes its large
    models: the 2B Gemma-2 model trains on one 24 GB GPU, and with ``quantization="4bit"`` (QLoRA) the 27B one on
    48 GB (see :doc:`/large_models`). The checkpoint then holds the adapter only (83 MB for rank 16 on the 2B
    model), with metadata that names the base model; :func:`sc_c2s.models.load` applies it to its base.

    Parameters
    ----------
    {doc_adata}
    label_key
        Column of ``obs`` with the cell types to learn; needed by the cell-type tasks only. The labels are read
        as text (``1`` and ``True`` become ``"1"`` and ``"True"``, as :func:`~sc_c2s.tl.annotate` writes them
        back), one line each, without a space at either end. Prediction needs two labels or more; generation
        alone learns from one (a generator of a single population).
    base_model
        ``"scratch"``, a name from :func:`sc_c2s.models.available`, or a checkpoint directory. Training a
        checkpoint this function wrote goes on with the labels of this data, which its metadata then lists (the
        candidates of ``annotate(labels="model")``), and its genes beside those it knew; a model from scratch
        spells only the words of the data it was built for, so new labels need their words among those.
    output_dir
        Directory to write the checkpoint to; created if needed, and it must be empty. A save that fails (a full
        disk) or is interrupted leaves it as it was.
    tasks
        Tasks to train, any of ``"cell_type_prediction"`` and ``"cell_type_generation"`` (one sample per cell),
        the multi-cell tasks of C2S-Scale ``"tissue_prediction"``, ``"tissue_generation"`` and ``"summary"``, and
        ``"perturbation"``. The default trains a model that both annotates and generates; to annotate only,
        ``["cell_type_prediction"]`` trains faster and annotated validation cells as well or better (see the
        method page). A multi-cell sample holds 5 to 20 (`n_cells`) cells of the same tissue and group, drawn
        anew every epoch; each (tissue, group) of ``n`` training cells gives ``ceil(n / mean size)`` samples per
        task and epoch.
        The perturbation task pairs every perturbed cell (``obs[condition_key]`` other than `control`) with a
        control cell of its `pair_by` group, drawn at random anew every epoch from the seeded training stream;
        the control cell's sentence is the prompt (:func:`sc_c2s.prompts.perturbation`, naming the perturbed
        cell's condition) and the perturbed cell's sentence the answer. Several perturbations train one model.
    tissue_key
        Column of ``obs`` with each cell's tissue (every cell needs one), for ``"tissue_prediction"`` and
        ``"tissue_generation"``.
    groupby
        Column of ``obs`` with each cell's sample or donor (every cell needs one): multi-cell samples never mix
        groups (nor tissues).
        ``None``: groups are the tissues; the ``"summary"`` task needs a column, whose groups its texts describe.
    summaries
        For ``"summary"``: a text per group of `groupby` (a mapping from group to text, or a column of ``obs``
        holding each cell's group's text); groups without one (or with ``None`` or NaN) give no summary sample.
        The published instruction is the prompt. Keys are values of ``obs[groupby]`` (or their strings); keys
        that are no group are left out with a warning, and a column must give all cells of a group the same text.
    n_cells
        Fewest and most cells of a multi-cell sample (C2S-Scale drew 5 to 20).
    paraphrase
        Give each summary sample an instruction drawn among the published one and our paraphrases
        (:data:`sc_c2s.prompts.SUMMARY_PARAPHRASES`), so the model learns the task rather than one wording;
        :func:`sc_c2s.tl.summarize` prompts with the published one.
    n_genes
        Genes per cell sentence, best first: at most as many as :func:`sc_c2s.pp.to_sentences` kept, which the
        prompts then name. The model records the length it trained on as its ``n_genes``, which
        :func:`sc_c2s.tl.annotate` and :func:`sc_c2s.tl.embed` use unless told otherwise, and the median length of
        each label's sentences, which :func:`sc_c2s.tl.generate` asks each cell type for. From scratch, 400
        annotated many fine-grained types from several sources better than 200, and PBMC types worse (see
        :doc:`/method`).
    {doc_organism} From scratch, ``None`` means ``"Homo sapiens"``.
    epochs
        Most passes over the training samples; ``None``: the budget above.
    max_steps
        Most optimiser steps; ``None``: the budget above. With `epochs` too, the smaller limit holds.
    max_time
        Seconds after which training stops (after the current step and an evaluation); the best weights so far
        are kept. ``None``: no limit. A run cannot be resumed where it stopped; to train a model from scratch
        further, pass its checkpoint as `base_model` with the learning rate and batch size of training from scratch
        (``learning_rate=2e-3, batch_size=16``) and a `max_steps`: the defaults for a checkpoint are those of a
        pretrained model.
    patience
        Evaluations in a row below the best held-out label accuracy after which training stops; ``None``: train
        the whole budget (and still keep the best weights).
    eval_every
        Optimiser steps between evaluations on the held-out cells; ``None``: 20 evaluations over the budget.
    batch_size
        Samples per optimiser step; ``None``: 16 from scratch, 8 for a pretrained model.
    learning_rate
        Peak learning rate of AdamW (linear warm-up, cosine decay); ``None``: ``2e-3`` from scratch, ``5e-5``
        for a pretrained model, ``2e-4`` for a LoRA adapter.
    gene_dropout
        Probability that a gene is left out of a cell's sentence in a cell-type prediction sample, drawn anew
        every epoch (data augmentation; generation samples keep whole sentences). Sentences with genes missing
        teach the model to rely on no single gene, which helps with cells whose detected genes differ, e.g. from
        another protocol.
    balance_labels
        How much rare labels are drawn more often in the single-cell samples of an epoch (drawn anew every
        epoch, as many as there are training cells): a label of ``n`` cells gets a share proportional to
        ``n ** (1 - balance_labels)``. ``0`` keeps the data's proportions (each cell once per epoch), ``1`` gives
        every label the same share, ``0.5`` a share proportional to the square root of its size.
    eval_fraction
        Share of the cells of each label held out of training to score the model (``0``: none); with the
        cell-type tasks only (a model trained on tissues, summaries or perturbations alone holds out no cells).
        A label of ``n`` cells gives ``round(eval_fraction * n)`` of them, keeping one for training. Fewer than 10
        held-out cells in all select the model on noise and do not calibrate its scores (no
        ``score_temperatures``): a warning says so, and another one when none is held out (training then runs its
        whole budget without model selection).
    random_state
        Seed of the held-out split, the initial weights (of a scratch model or a LoRA adapter), the order of the
        samples {doc_seed}. The seed used is recorded in the checkpoint's metadata (``training["random_state"]``).
        Torch's global random state, which training seeds, is given back as it was.
    device
        Torch device to train on; ``None`` picks CUDA when available, else the CPU.
    adapter
        ``"lora"`` to train a LoRA adapter (``pip install "sc-c2s[lora]"``) on a pretrained base model;
        ``None`` trains all weights.
    lora_rank
        Rank of the LoRA matrices (their scale alpha is twice the rank).
    target_modules
        List of the names of the linear layers LoRA adapts (with ``adapter="lora"``); ``None``: every projection
        of attention and MLP of the architecture (``query_key_value``, ``dense``, ``dense_h_to_4h``,
        ``dense_4h_to_h`` for GPT-NeoX; ``q_proj`` … ``down_proj`` for Gemma, Llama and the like; all linear layers
        otherwise).
    quantization
        ``"4bit"`` loads the base model in NF4 to train the adapter on it (QLoRA); on a CUDA GPU, with
        bitsandbytes (``pip install "sc-c2s[quantization]"``).
    gradient_checkpointing
        Recompute each layer's activations in the backward pass instead of keeping them: less memory, about a
        third more time. ``None``: on for base models of a billion parameters or more.
    condition_key
        Column of ``obs`` with each cell's condition (the perturbation, or `control`); task ``"perturbation"``.
    control
        The value of ``obs[condition_key]`` of the control (unperturbed) cells.
    pair_by
        Column or columns of ``obs`` (e.g. ``["cell_type", "donor"]``) within whose groups perturbed and control
        cells are paired; ``None`` pairs across all cells. Perturbed cells of groups without control cells are left
        out with a warning.
    {doc_mod}

    Returns
    -------
    The checkpoint directory: weights, tokenizer and ``c2s_metadata.json`` (prompt style, organism, vocabulary,
    labels, the rank fit of ``adata.uns["c2s"]``, the training parameters, the held-out cells and, for a model
    trained to annotate, their scores, the sampling temperature), or with an adapter its weights and the metadata
    (whose ``adapter`` names the base model, its revision and the sha256 of its files). Open it with
    :func:`sc_c2s.models.load`.

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)
    >>> path = sc_c2s.tl.finetune(
    ...     adata, label_key="bulk_labels", base_model="scratch", output_dir="pbmc_model"
    ... )  # doctest: +SKIP
    >>> model = sc_c2s.models.load(path)  # doctest: +SKIP
    >>> model.metadata.scores  # doctest: +SKIP

    A LoRA adapter on the 2B C2S-Scale model, on a GPU:

    >>> path = sc_c2s.tl.finetune(
    ...     adata, label_key="bulk_labels", base_model="C2S-Scale-Gemma-2-2B", output_dir="pbmc_lora", adapter="lora"
    ... )  # doctest: +SKIP
    """
    tasks = _check_tasks(tasks)
    start = logg.info(f"fine-tuning {base_model!r} for {', '.join(tasks)}")
    handler = DataHandler(adata, mod)
    handler.check_columns(
        label_key=label_key,
        tissue_key=tissue_key,
        groupby=groupby,
        summaries=summaries if isinstance(summaries, str) else None,
        condition_key=condition_key,
        pair_by=pair_by,
    )
    c2s = handler.c2s()
    if c2s.get("rank_fit") is not None:  # the model records it: refused now, not after training
        RankFit.from_dict(c2s["rank_fit"])
    single_cell = tuple(t for t in tasks if t in SINGLE_CELL_TASKS)
    labels = _labels(handler, label_key, tasks=single_cell) if single_cell else None
    if PERTURBATION in tasks:
        _check_conditions(condition_key, control)
    check_positive_int(n_genes, "n_genes")
    units = _samples.units(
        handler.obs,
        tasks=tuple(t for t in tasks if t in MULTI_CELL_TASKS),
        tissue_key=tissue_key,
        groupby=groupby,
        summaries=summaries,
        n_cells=n_cells,
    )
    tissue_set = units.tissues if {"tissue_prediction", "tissue_generation"} & set(tasks) else []
    check_number(gene_dropout, "gene_dropout", low=0, high=1, high_open=True)
    check_number(balance_labels, "balance_labels", low=0, high=1)
    check_number(eval_fraction, "eval_fraction", low=0, high=1, high_open=True)
    check_positive_int(epochs, "epochs", none_ok=True)
    check_positive_int(max_steps, "max_steps", none_ok=True)
    check_number(max_time, "max_time", low=0, low_open=True, none_ok=True)
    check_positive_int(patience, "patience", none_ok=True)
    check_positive_int(eval_every, "eval_every", none_ok=True)
    check_positive_int(batch_size, "batch_size", none_ok=True)
    paraphrase = check_flag(paraphrase, "paraphrase")
    gradient_checkpointing = check_flag(gradient_checkpointing, "gradient_checkpointing", none_ok=True)
    check_number(learning_rate, "learning_rate", low=0, low_open=True, none_ok=True)
    random_state = check_random_state(random_state)
    if organism is not None:
        prompts.check_organism(organism)
    if device is not None:
        _runtime.check_device(device)
    output_dir = _check_output_dir(output_dir)
    scratch = str(base_model) == SCRATCH
    check_name_or_path(base_model, also=[SCRATCH])
    target_modules = _check_adapter(
        adapter,
        base_model=base_model,
        scratch=scratch,
        quantization=quantization,
        lora_rank=lora_rank,
        target_modules=target_modules,
    )
    batch_size = _default(batch_size, _BATCH_SIZE, scratch)
    learning_rate = _default(
        learning_rate, (_LEARNING_RATE[0], _LORA_LEARNING_RATE if adapter else _LEARNING_RATE[1]), scratch
    )

    ranked = np.asarray(handler.obsm[_keys.GENES][:, :n_genes])
    n_genes = ranked.shape[1]  # the prompts say how many genes the sentences hold, as annotate's will
    genes = np.asarray(c2s["genes"], dtype=object)
    expressed = (ranked >= 0).any(axis=1)
    if not expressed.all():
        logg.warning(f"{int((~expressed).sum())} cells express no gene and are left out of training")
    is_eval = (
        split(labels, eval_fraction=eval_fraction, random_state=random_state)
        if labels is not None
        else np.zeros(handler.n_obs, dtype=bool)
    )
    train_cells = np.flatnonzero(~is_eval & expressed)
    eval_cells = np.flatnonzero(is_eval & expressed)
    if not len(train_cells):
        msg = (
            "No cell is left to train on: the cells outside the held-out share express no gene (empty sentences). "
            "Check that `sc_c2s.pp.to_sentences` ranked the expression you meant (`layer=`, `use_raw=`)."
        )
        raise ValueError(msg)
    if labels is not None and eval_fraction > 0:
        _warn_few_held_out(labels, eval_fraction=eval_fraction, n_held_out=len(eval_cells))
    if len(eval_cells) and not handler.obs_names.is_unique:
        n_shared = handler.obs_names[handler.obs_names.duplicated()].nunique()
        logg.warning(
            f"{n_shared} obs_names are shared by several cells: training['eval_obs_names'] will also name the cells "
            "that share a held-out cell's name; make them unique first (`adata.obs_names_make_unique()`)"
        )
    label_set = sorted(labels.unique()) if labels is not None else []
    design = (
        _pairs.design(
            handler.obs, condition_key=condition_key, control=control, pair_by=pair_by, usable=~is_eval & expressed
        )
        if PERTURBATION in tasks
        else None
    )
    perturbation_set = sorted(set(design.perturbations)) if design is not None else []
    vocabulary = genes[np.unique(ranked[ranked >= 0])].tolist()

    c2s_model = _base(
        base_model,
        vocabulary,
        [
            *label_set,
            *units.words(),
            *perturbation_set,
            *([" ".join(prompts.PERTURBATION_WORDS)] if design is not None else []),
        ],
        n_genes=n_genes,
        n_cells=len(train_cells),
        max_cells=units.n_cells[1] if units.tasks else 0,
        max_length=units.max_length(n_genes) if units.tasks else None,
        device=device,
        seed=random_state,
        adapter=adapter is not None,
        quantization=quantization,
    )
    base_record = c2s_model.provenance()
    n_parameters = sum(p.numel() for p in c2s_model.model.parameters())
    if gradient_checkpointing is None:
        gradient_checkpointing = not scratch and n_parameters >= _lora.CHECKPOINTING_FROM
    if adapter is not None:
        c2s_model.model = _lora.add_lora(
            c2s_model.model,
            rank=lora_rank,
            target_modules=target_modules,
            gradient_checkpointing=gradient_checkpointing,
            quantized=quantization is not None,
            seed=random_state,
        )
    elif gradient_checkpointing:
        enable_activation_checkpointing(c2s_model.model)
    upper = c2s_model.metadata.upper_case
    organism = model_organism(c2s_model, organism)
    tokenizer, model = c2s_model.tokenizer, c2s_model.model
    if adapter is not None:
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logg.info(f"    LoRA adapter of rank {lora_rank}: {n_trained:,} of {n_parameters:,} parameters trained")
    words = [genes[row[row >= 0]].tolist() for row in ranked]
    train_words = [words[i] for i in train_cells]
    max_length = _runtime.context_length(model, tokenizer)
    train_labels = labels.iloc[train_cells].tolist() if single_cell else []
    encode = partial(
        _samples.encode,
        tokenizer,
        tasks=single_cell,
        organism=organism,
        upper=upper,
        max_length=max_length,
        n_genes=n_genes,
    )
    multi_cell = units.spec(train_words, train_cells, n_genes=n_genes, paraphrase=paraphrase)
    pairs = partial(_pair_samples, tokenizer, words, design, n_genes=n_genes, upper=upper, max_length=max_length)

    def draw(rng: np.random.Generator, *, dropout: float = 0.0, balance: float = 0.0) -> _trainer.Samples:
        """One epoch's samples: single-cell, multi-cell, perturbation pairs.

        Single-cell samples are drawn at `balance` (see :func:`_samples.balanced`), their genes dropped at
        `dropout`.
        """
        cells = (
            _samples.balanced(train_labels, balance=balance, rng=rng)
            if balance and train_labels
            else range(len(train_labels))
        )
        parts = [
            encode([train_words[i] for i in cells], [train_labels[i] for i in cells], gene_dropout=dropout, rng=rng)
        ]
        if multi_cell is not None:
            parts.append(
                _samples.encode_multi_cell(
                    tokenizer, multi_cell, organism=organism, upper=upper, max_length=max_length, rng=rng
                )
            )
        if design is not None:
            parts.append(pairs(rng))
        return _samples.concat(*parts)

    trained_vocabulary = _vocabulary(tokenizer, vocabulary, base=c2s_model.metadata.vocabulary, upper=upper)
    _check_known_genes(c2s_model, vocabulary, trained_vocabulary, upper=upper)
    if "cell_type_generation" in tasks or design is not None:  # what generate and predict_perturbation will write
        budget = token_budget(c2s_model, genes, n_genes, unique_genes=True)
        if "cell_type_generation" in tasks:
            texts = [prompts.cell_type_generation(label, n_genes=n_genes, organism=organism) for label in label_set]
            prompt_ids = _runtime.tokenize(tokenizer, texts)
            check_room(c2s_model, prompt_ids, budget, n_genes=n_genes, unique_genes=True)
        if design is not None:
            _check_perturbation_room(c2s_model, budget, words, design, n_genes=n_genes, upper=upper)
    samples = draw(np.random.default_rng(random_state))
    _check_unknown(tokenizer, samples, names=[*label_set, *tissue_set, *perturbation_set])
    check_labels(c2s_model, label_set, _candidates.label_answers(tokenizer, label_set))
    held_out = _held_out(
        tokenizer,
        [words[i] for i in eval_cells],
        labels.iloc[eval_cells].tolist() if single_cell else [],
        label_set,
        tasks=single_cell,
        organism=organism,
        upper=upper,
        max_length=max_length,
        n_genes=n_genes,
        random_state=random_state,
    )
    if samples.n_truncated:
        logg.warning(f"{samples.n_truncated} samples were longer than the model's context; their sentences were cut")
    logg.info(
        f"    {len(train_cells)} cells, {len(tasks)} task{'s' if len(tasks) > 1 else ''}: {len(samples)} samples "
        f"({int(sum(len(ids) for ids in samples.input_ids))} tokens), {len(eval_cells)} cells held out"
    )
    max_steps = _trainer.budget(len(samples), batch_size, epochs=epochs, max_steps=max_steps, scratch=scratch)
    train_start = time.perf_counter()
    result = _trainer.train(
        model,
        samples,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        pad_id=_runtime.pad_id(tokenizer),
        random_state=random_state,
        resample=(
            (lambda rng: draw(rng, dropout=gene_dropout, balance=balance_labels))
            if gene_dropout or balance_labels or multi_cell or design
            else None
        ),
        held_out=held_out,
        eval_every=eval_every,
        patience=patience,
        max_time=max_time,
    )
    train_seconds = time.perf_counter() - train_start

    metadata = c2s_model.metadata
    metadata.name = output_dir.resolve().name  # "." names the folder
    metadata.prompt_style = "c2s"  # the prompts of `sc_c2s.prompts`, whatever the base was trained on
    metadata.tasks = list(tasks)
    metadata.organism = organism
    metadata.answer_prefix = " "  # the samples of `_samples` put a space before the answer
    metadata.n_genes = int(n_genes)
    metadata.vocabulary = trained_vocabulary
    metadata.labels = label_set or None
    metadata.tissues = tissue_set or None
    metadata.perturbations = perturbation_set or None
    metadata.sentence_lengths = (
        _sentence_lengths(ranked[train_cells], train_labels) if "cell_type_generation" in tasks else None
    )
    metadata.rank_fit = c2s.get("rank_fit")
    metadata.adapter = None  # a whole model, even when trained from an adapter's weights
    metadata.temperature = None  # the base's was chosen for other weights; chosen again below where it can be
    metadata.training = {
        "base_model": str(Path(base_model).expanduser().resolve())
        if Path(base_model).expanduser().is_dir()
        else str(base_model),
        "label_key": label_key,
        **(
            {
                "tissue_key": tissue_key,
                "groupby": groupby,
                "n_cells": list(units.n_cells),
                **({"paraphrase": paraphrase} if "summary" in tasks else {}),
            }
            if units.tasks
            else {}
        ),
        "epochs": epochs,
        "max_steps": max_steps,
        "max_time": max_time,
        "patience": patience,
        "eval_every": eval_every,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "gene_dropout": gene_dropout,
        "balance_labels": balance_labels,
        "eval_fraction": eval_fraction,
        "random_state": random_state,
        "n_train_cells": len(train_cells),
        "n_samples": len(samples),
        "n_truncated": samples.n_truncated,
        "loss": [round(x, 5) for x in result.loss],
        "steps": result.steps,
        "stopped": result.stopped,
        "best_step": result.best_step,
        "curve": result.curve,
        "train_seconds": round(train_seconds, 1),
        "n_tokens": result.n_tokens,
        "device": str(c2s_model.device),
        "gradient_checkpointing": bool(gradient_checkpointing),
        **(
            {
                "condition_key": condition_key,
                "control": control,
                "pair_by": pair_by,
                "n_perturbed_cells": len(design.perturbed),
            }
            if design is not None
            else {}
        ),
        "eval_obs_names": handler.obs_names[eval_cells].tolist(),
        "sc_c2s": version("sc-c2s"),
    }
    if adapter is not None:
        metadata.training |= {"adapter": adapter, "lora_rank": lora_rank, "quantization": quantization}
        metadata.adapter = {
            "method": adapter,
            "rank": lora_rank,
            "alpha": 2 * lora_rank,
            "target_modules": _lora.targets(model),
            "quantization": quantization,
            "base": {
                "model": base_record["model"],
                "path": str(Path(base_record["path"]).resolve()),
                "revision": base_record.get("revision"),
                "sha256": base_record["sha256"],
            },
        }
    c2s_model.path = output_dir
    metadata.scores, metadata.score_temperatures = (
        _evaluate(
            c2s_model,
            handler,
            c2s,
            _scored_cells(eval_cells, labels, random_state=random_state),
            labels,
            n_genes=n_genes,
        )
        if "cell_type_prediction" in tasks
        else ({}, {})
    )
    if "cell_type_generation" in tasks and c2s.get("rank_fit") is not None:
        chosen = choose_temperature(
            adata,
            c2s_model,
            labels=labels[expressed],
            label_key=label_key,
            random_state=random_state,
            mod=mod,
        )
        if chosen is not None:
            metadata.temperature, metadata.training["temperature_mmd"] = chosen
    _save(c2s_model, output_dir)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in metadata.scores.items() if k in {"accuracy", "macro_f1"})
    logg.info(f"    finished{f' (held out: {scores})' if scores else ''}", time=start, deep=f"wrote {output_dir}")
    return output_dir


def _sentence_lengths(ranked: np.ndarray, labels: Sequence[str]) -> dict[str, int]:
    """Median genes per sentence of each label's cells (rows of `ranked`), rounded half up, at least 1."""
    lengths = pd.Series((ranked >= 0).sum(axis=1), index=pd.Index(labels, dtype=object))
    medians = lengths.groupby(level=0).median()
    return {str(label): max(1, int(np.floor(m + 0.5))) for label, m in medians.items()}


def _check_known_genes(c2s_model: C2SModel, genes: list[str], trained_vocabulary: list[str], *, upper: bool) -> None:
    """Refuse, before training, data of which the model will know no gene after it.

    A base model trained from scratch spells the genes of its own data only; on data under other gene names it would
    train its whole budget, then fail to read the held-out cells, as annotation would after it.
    """
    case = str.upper if upper else str
    if {case(gene) for gene in genes}.isdisjoint(map(case, trained_vocabulary)):
        msg = (
            f"None of the genes of the sentences (e.g. {genes[0]!r}) is a word of {c2s_model.name!r}: a model trained "
            "from scratch knows only the genes of the data it was built for. Rank the genes under the names it was "
            "trained on (e.g. symbols, not Ensembl IDs; `gene_symbols=` of `sc_c2s.pp.to_sentences`), or train from "
            '`base_model="scratch"`, which builds a vocabulary for this data.'
        )
        raise ValueError(msg)


def _check_perturbation_room(
    c2s_model: C2SModel,
    budget: dict[str, Any],
    words: list[list[str]],
    design: _pairs.Design,
    *,
    n_genes: int,
    upper: bool,
) -> None:
    """Refuse, before training, `n_genes` that :func:`sc_c2s.tl.predict_perturbation` could not write after.

    Its prompts hold a control cell's sentence of `n_genes` genes, and the predicted sentence as many (`budget`, of
    :func:`~sc_c2s.tl._sampling.token_budget`): a base model whose context is too short for both (one trained from
    scratch with fewer genes) would train in vain. The message names the most genes that fit.
    """
    limit = getattr(c2s_model.model.config, "max_position_embeddings", None)
    controls = design.pairs.controls
    longest = sorted(controls, key=lambda i: len(words[i]), reverse=True)[:10]
    names = sorted(set(design.perturbations))

    def fits(n: int) -> bool:
        texts = [
            prompts.perturbation(words[i][:n], perturbation_name=name, n_genes=n, upper=upper)
            for i in longest
            for name in names
        ]
        room = new_tokens(budget["tokens_per_gene"], budget["gene_tokens"], n, budget["n_distinct"])
        return max(map(len, _runtime.tokenize(c2s_model.tokenizer, texts))) + room <= limit

    if limit is None or fits(n_genes):
        return
    most = most_that_fit(n_genes, fits)  # prompts and sentences grow with the genes
    msg = (
        f"Perturbation prompts and predicted sentences of {n_genes} genes do not fit in the {limit} tokens "
        f"{c2s_model.name!r} reads; ask for at most `n_genes={most}`."
    )
    raise ValueError(msg)


def _save(c2s_model: C2SModel, output_dir: Path) -> None:
    """Write the checkpoint; a save that fails or is interrupted (a full disk, Ctrl-C) takes away what it wrote.

    Half a checkpoint would load as a model without its metadata, with the defaults, and would make the same call
    fail again, its folder no longer empty.
    """
    created = [folder for folder in (output_dir, *output_dir.absolute().parents) if not folder.exists()]
    try:
        c2s_model.save(output_dir)
    except BaseException:
        with suppress(OSError):  # the error to show is the save's
            if created:  # the folders the save made, the checkpoint's and those above it
                shutil.rmtree(created[-1])
            else:  # empty before: `_check_output_dir`
                for path in output_dir.iterdir():
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        raise


def split(labels: pd.Series, *, eval_fraction: float, random_state: int = 0) -> np.ndarray:
    """Boolean mask of the held-out cells: ``round(eval_fraction * n)`` of each label's ``n`` cells, seeded.

    Every label keeps at least one training cell.
    """
    rng = np.random.default_rng(random_state)
    codes, uniques = pd.factorize(labels, sort=True)
    is_eval = np.zeros(len(labels), dtype=bool)
    for code in range(len(uniques)):
        cells = np.flatnonzero(codes == code)
        n_eval = min(round(eval_fraction * len(cells)), len(cells) - 1)
        is_eval[rng.permutation(cells)[:n_eval]] = True
    return is_eval


def scores(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean F1 over the labels that are true or predicted)."""
    truth, predicted = np.asarray(truth, dtype=object), np.asarray(predicted, dtype=object)
    f1 = []
    for label in pd.unique(np.concatenate([truth, predicted])):
        tp = np.sum((truth == label) & (predicted == label))
        n = np.sum(truth == label) + np.sum(predicted == label)
        f1.append(2 * tp / n)
    return {"accuracy": float(np.mean(truth == predicted)), "macro_f1": float(np.mean(f1))}


def _labels(handler: DataHandler, label_key: str | None, *, tasks: Sequence[str]) -> pd.Series:
    """Return the labels as strings, checked: present, complete, one line each, and at least two to predict."""
    if label_key is None:
        msg = f"The tasks {list(tasks)} learn cell types: pass `label_key=` with the column of `obs` that holds them."
        raise ValueError(msg)
    labels = _samples.text_column(handler.obs, label_key, arg="label_key", what="label")
    if "cell_type_prediction" in tasks and labels.nunique() < 2:
        msg = (
            f"obs[{label_key!r}] has a single label ({labels.iloc[0]!r}); a classifier needs at least two. To "
            'generate cells of this type, train generation alone: `tasks=["cell_type_generation"]`.'
        )
        raise ValueError(msg)
    return labels


def _warn_few_held_out(labels: pd.Series, *, eval_fraction: float, n_held_out: int) -> None:
    """Warn when `eval_fraction` holds out fewer than :data:`MIN_EVAL_CELLS` cells, naming one that does better."""
    if n_held_out >= MIN_EVAL_CELLS:
        return
    if n_held_out:
        logg.warning(
            f"`eval_fraction={eval_fraction}` holds out {n_held_out} cells: fewer than {MIN_EVAL_CELLS} select the "
            "model on noise (and leave its scores uncalibrated); pass a larger `eval_fraction`, or 0 to train the "
            "whole budget without selection"
        )
        return
    smallest = min((n for n in labels.value_counts() if n > 1), default=2)
    enough = (50 // smallest + 1) / 100  # round(enough * n) >= 1 for every label of n >= smallest cells
    logg.warning(
        f"`eval_fraction={eval_fraction}` holds out no cell: training runs its whole budget without model selection "
        f"(nor held-out scores); `eval_fraction={enough}` holds out at least one cell of each label with more than one"
    )


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks) if isinstance(tasks, Iterable) else tasks
    if not isinstance(tasks, tuple) or not tasks or any(t not in TASKS for t in tasks):
        msg = f"`tasks` must be a non-empty selection of {TASKS}, got {tasks!r}."
        raise ValueError(msg)
    return tuple(dict.fromkeys(tasks))


def _check_conditions(condition_key: str | None, control: str | None) -> None:
    """Refuse the perturbation task without `condition_key` and `control`."""
    if condition_key is None or control is None:
        msg = (
            'The task "perturbation" needs `condition_key` (the obs column of each cell\'s condition) and `control` '
            "(its value for control cells)."
        )
        raise ValueError(msg)


def _pair_samples(
    tokenizer,
    words: list[list[str]],
    design: _pairs.Design,
    rng: np.random.Generator,
    *,
    n_genes: int,
    upper: bool,
    max_length: int,
) -> _trainer.Samples:
    """Perturbation samples of every perturbed cell with a control cell of its group drawn from `rng`."""
    controls = design.pairs.draw(rng)
    return _samples.encode_perturbation(
        tokenizer,
        [words[i] for i in controls],
        [words[i] for i in design.perturbed],
        design.perturbations,
        n_genes=n_genes,
        upper=upper,
        max_length=max_length,
    )


def _held_out(
    tokenizer,
    words: list[list[str]],
    labels: list[str],
    label_set: list[str],
    *,
    tasks: Sequence[str],
    random_state: int,
    **kwargs,
) -> dict[str, _trainer.Choices | _trainer.Answers]:
    """Encode the held-out cells of each single-cell task under every label, for model selection.

    Prediction: each cell's prompt once and every label's answer (:class:`~sc_c2s.models._trainer.Answers`), for
    at most :data:`~sc_c2s.models._trainer.EVAL_SAMPLES` cells. Generation: each cell's sentence after every
    label's prompt (:class:`~sc_c2s.models._trainer.Choices`), for at most ``EVAL_SAMPLES`` cells × labels. Beyond
    that, a seeded subset of the held-out cells.
    """
    out: dict[str, _trainer.Choices | _trainer.Answers] = {}
    for task in tasks:
        n_keep = _trainer.EVAL_SAMPLES if task == "cell_type_prediction" else _trainer.EVAL_SAMPLES // len(label_set)
        n_keep = max(n_keep, 1)
        keep = np.arange(len(words))
        if len(words) > n_keep:
            keep = np.sort(np.random.default_rng(random_state).choice(len(words), n_keep, replace=False))
        cell_words = [words[i] for i in keep]
        truth = np.array([label_set.index(labels[i]) for i in keep], dtype=int)
        if task == "cell_type_prediction":
            answers = _candidates.label_answers(tokenizer, label_set)
            longest = label_set[int(np.argmax([len(ids) for ids in answers]))]  # a prompt it fits fits every label's
            samples = _samples.encode(
                tokenizer, cell_words, [longest] * len(keep), tasks=(task,), what="held-out", **kwargs
            )
            cell_prompts = [ids[:n] for ids, n in zip(samples.input_ids, samples.n_prompt, strict=True)]
            out[task] = _trainer.Answers(cell_prompts, answers, truth)
        else:
            out[task] = _trainer.Choices(
                [
                    _samples.encode(
                        tokenizer, cell_words, [label] * len(keep), tasks=(task,), what="held-out", **kwargs
                    )
                    for label in label_set
                ],
                truth,
            )
    return out


def _check_adapter(
    adapter: str | None,
    *,
    base_model: str | Path,
    scratch: bool,
    quantization: str | None,
    lora_rank: int,
    target_modules: Sequence[str] | None,
) -> list[str] | None:
    """Refuse adapter settings that cannot train, before any model is loaded; return the `target_modules` as a list."""
    if adapter not in {None, "lora"}:
        msg = f'`adapter` must be "lora" or None, got {adapter!r}.'
        raise ValueError(msg)
    if quantization not in {None, "4bit"}:
        msg = f'`quantization` must be "4bit" (QLoRA) or None, got {quantization!r}.'
        raise ValueError(msg)
    if target_modules is not None:
        modules = [] if isinstance(target_modules, str) else list(target_modules)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            msg = f'`target_modules` must be a list of module names, e.g. ["query_key_value"]; got {target_modules!r}.'
            raise ValueError(msg)
        target_modules = modules
    if adapter is None:
        if quantization is not None:
            msg = 'Quantised weights cannot be trained; pass `adapter="lora"` to train an adapter on them (QLoRA).'
            raise ValueError(msg)
        if target_modules is not None:
            msg = '`target_modules` are the layers a LoRA adapter adapts; pass `adapter="lora"`, or leave them out.'
            raise ValueError(msg)
        return None
    if scratch:
        msg = 'A LoRA adapter adapts a pretrained model; pass a `base_model` other than "scratch", or `adapter=None`.'
        raise ValueError(msg)
    if _lora.is_adapter_dir(Path(base_model).expanduser()):
        msg = (
            f"{str(base_model)!r} is itself a LoRA adapter. Fold it into its base and save that "
            "(`sc_c2s.models.load(path, merge=True).save(new_path)`), then train an adapter on `new_path`; or "
            "fine-tune all weights (`adapter=None`)."
        )
        raise ValueError(msg)
    check_positive_int(lora_rank, "lora_rank")
    _lora.peft()
    return target_modules


def _check_output_dir(output_dir: str | Path) -> Path:
    """Refuse, before training and creating nothing, a directory with files in it or one that cannot be written.

    ``~`` is expanded as :func:`sc_c2s.models.load` expands it. The nearest existing folder of the path (the
    directory itself, or the ancestor it would be created in) must be a directory this process can write to.
    """
    output_dir = Path(output_dir).expanduser()
    if (output_dir / _files.SAVING_FILE).exists():
        msg = (
            f"`output_dir` {str(output_dir)!r} holds a checkpoint whose save stopped half-way (a killed process); "
            "remove the directory, or pass a new one."
        )
        raise FileExistsError(msg)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        msg = f"`output_dir` {str(output_dir)!r} exists and is not an empty directory; pass a new directory."
        raise FileExistsError(msg)
    existing = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        msg = (
            f"`output_dir` {str(output_dir)!r} cannot be created: {str(existing)!r} is a file; pass a path in a folder."
        )
        raise NotADirectoryError(msg)
    if not os.access(existing, os.W_OK | os.X_OK):
        msg = (
            f"`output_dir` {str(output_dir)!r} cannot be created: this process cannot write to {str(existing)!r}; "
            "pass a path in a folder you can write to."
        )
        raise PermissionError(msg)
    return output_dir


def _default(value, defaults: tuple, scratch: bool):
    return value if value is not None else defaults[0 if scratch else 1]


def _base(
    base_model: str | Path,
    vocabulary: list[str],
    labels: list[str],
    *,
    n_genes: int,
    n_cells: int,
    device: str | torch.device | None,
    seed: int,
    adapter: bool = False,
    quantization: str | None = None,
    max_cells: int = 0,
    max_length: int | None = None,
) -> C2SModel:
    """Build or load the model to train on `device`: in float32, or for an adapter in the default dtype."""
    from sc_c2s.models._model import C2SModel
    from sc_c2s.models._scratch import build_model, build_tokenizer, scratch_size

    if str(base_model) != SCRATCH:
        from sc_c2s.models import load

        if adapter:  # frozen: in bfloat16 on a GPU, or quantised
            return load(base_model, device=device, quantization=quantization)
        # an adapter's weights folded in (registry names are whole models)
        c2s_model = load(
            base_model, device=device, dtype="float32", merge=_lora.is_adapter_dir(Path(base_model).expanduser())
        )
        c2s_model.model.requires_grad_(True)  # all of them, also those an adapter had frozen
        return c2s_model
    metadata = C2SMetadata()
    words = [w.upper() for w in vocabulary] if metadata.upper_case else vocabulary
    tokenizer = build_tokenizer(words, labels, max_genes=n_genes, max_cells=max_cells, max_length=max_length)
    model = build_model(tokenizer, **scratch_size(n_cells), seed=seed)
    device, _ = _runtime.device_and_dtype(device, "float32")
    return C2SModel(model=model.to(device), tokenizer=tokenizer, metadata=metadata, path=Path(SCRATCH))


def _vocabulary(tokenizer, genes: list[str], *, base: list[str] | None, upper: bool) -> list[str]:
    """Return the genes the trained model can write: the base model's vocabulary, and those of `genes` it spells.

    A model from scratch (no `base`) was built for `genes`, and a published model (no `base` either) spells any
    gene; a tokenizer of whole gene words, that of a model trained from scratch before, spells its own only.
    """
    if base is None:
        return genes
    unk = tokenizer.unk_token_id
    if unk is not None:
        ids = tokenizer([" " + (gene.upper() if upper else gene) for gene in genes], add_special_tokens=False)
        genes = [gene for gene, gene_ids in zip(genes, ids["input_ids"], strict=True) if unk not in gene_ids]
    return list(dict.fromkeys([*base, *genes]))


def _check_unknown(tokenizer, samples: _trainer.Samples, *, names: Sequence[str]) -> None:
    """Refuse names (labels, tissues, perturbations) the tokenizer cannot spell; warn about other unknown words."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    unspelled = [
        name for name, ids in zip(names, _candidates.label_answers(tokenizer, names), strict=True) if unk in ids
    ]
    if unspelled:
        msg = (
            f"The base model's tokenizer has no words for the names {unspelled[:10]} (cell types, tissues or "
            "perturbations): a model trained from scratch knows only the words of the data it was built for. Continue "
            'training on names it can spell, or train from `base_model="scratch"`, which builds a vocabulary for '
            "this data."
        )
        raise ValueError(msg)
    # not the EOS that ends every sample, which is Pythia's unknown token too
    n_unknown = sum(int((ids[:-1] == unk).sum()) for ids in samples.input_ids)
    if n_unknown:
        n_tokens = sum(len(ids) for ids in samples.input_ids)
        logg.warning(
            f"{n_unknown / n_tokens:.1%} of the tokens are unknown to the base model's tokenizer (genes, or words of "
            "summaries, it has no word for); training from scratch builds a vocabulary for this data"
        )


def _scored_cells(cells: np.ndarray, labels: pd.Series, *, random_state: int) -> np.ndarray:
    """Return the held-out `cells` to score after training: all, or about :data:`MAX_SCORED_CELLS` of them.

    Each label keeps its share (rounded down, at least one cell), drawn with `random_state`: annotating a tenth of
    an atlas would take longer than the training.
    """
    if len(cells) <= MAX_SCORED_CELLS:
        return cells
    rng = np.random.default_rng(random_state)
    share = MAX_SCORED_CELLS / len(cells)
    of = labels.iloc[cells].to_numpy()
    groups = [cells[of == label] for label in np.unique(of)]
    return np.sort(np.concatenate([rng.choice(g, max(1, int(share * len(g))), replace=False) for g in groups]))


def _evaluate(
    c2s_model: C2SModel,
    handler: DataHandler,
    c2s: dict,
    cells: np.ndarray,
    labels: pd.Series,
    *,
    n_genes: int,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Constrained annotation of the held-out `cells`: its scores, and the temperatures that calibrate it.

    Returns accuracy and macro-F1 with the labels re-ranked per cell (as ``metadata.scores``), and the temperature
    of :func:`~sc_c2s.tl._calibration.fit_temperature` for the prediction alone and for the re-ranked labels,
    keyed by the number re-ranked (as ``metadata.score_temperatures``; none from fewer than
    :data:`MIN_EVAL_CELLS` held-out cells).
    """
    if not len(cells):
        return {}, {}
    held_out = AnnData(
        obs=pd.DataFrame(index=np.arange(len(cells)).astype(str)),  # positions: obs_names may repeat
        obsm={_keys.GENES: np.asarray(handler.obsm[_keys.GENES])[cells]},
        uns={_keys.C2S: {"genes": c2s["genes"], "params": c2s["params"]}},
    )
    label_set = list(c2s_model.metadata.labels)
    readings = label_loglik(
        c2s_model,
        cell_words(held_out, c2s_model, n_genes=n_genes, mod=None),
        label_set,
        n_genes=n_genes,
        organism=c2s_model.metadata.organism,
        rerank=None,
        batch_size=_runtime.resolve_batch_size(None, c2s_model.device),
    )
    rerank = max(readings)
    truth = labels.iloc[cells].astype(str).to_numpy()
    predicted = np.asarray(label_set, dtype=object)[readings[rerank].argmax(axis=1)]
    codes = pd.Index(label_set).get_indexer(truth)  # the labels of every cell, held-out ones too
    temperatures = (
        {str(k): round(fit_temperature(loglik, codes), 4) for k, loglik in readings.items()}
        if len(cells) >= MIN_EVAL_CELLS  # one wrong cell of a few drives the fit to its upper bound
        else {}
    )
    return {
        **scores(truth, predicted),
        "n_cells": len(cells),
        "annotation": "constrained",
        "rerank": rerank,
    }, temperatures
