from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import log_softmax, softmax
from sklearn.metrics import accuracy_score, f1_score

import sc_c2s
from sc_c2s import prompts
from sc_c2s._data import DataHandler
from sc_c2s.models import C2SMetadata, _candidates, _dropout, _output_loss, _runtime, _trainer, load
from sc_c2s.models._metadata import METADATA_FILE
from sc_c2s.models._scratch import build_model, build_tokenizer
from sc_c2s.tl import _finetune, _generate, _samples, _score_generation, _utils
from sc_c2s.tl._annotate import label_loglik
from sc_c2s.tl._calibration import fit_temperature
from sc_c2s.tl._finetune import _evaluate, scores, split
from sc_c2s.tl._temperature import choose_temperature

from .conftest import DATA, captured_log

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_GENES = 20
EVAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def trained(_cellbench, tmp_path_factory, one_torch_thread):
    """A tiny model trained from scratch on 240 CellBench cells, a tenth of their genes dropped; 60 held out."""
    adata = _cellbench.copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=N_GENES)
    before = adata.copy()
    path = sc_c2s.tl.finetune(
        adata,
        label_key="cell_type",
        base_model="scratch",
        output_dir=tmp_path_factory.mktemp("finetune") / "model",
        tasks=("cell_type_prediction",),
        n_genes=N_GENES,
        epochs=6,
        batch_size=16,
        gene_dropout=0.1,
        eval_fraction=EVAL_FRACTION,
    )
    return adata, before, path


def held_out(adata, metadata: C2SMetadata):
    return adata[metadata.training["eval_obs_names"]].copy()


def test_annotates_held_out_cells_far_above_chance(trained):
    adata, _, path = trained
    model = load(path)
    cells = held_out(adata, model.metadata)
    sc_c2s.tl.annotate(cells, model=model, labels="model", n_genes=N_GENES)
    truth, predicted = cells.obs["cell_type"].astype(str), cells.obs["c2s_cell_type"].astype(str)
    # five cell lines: chance is 0.2, the largest class 0.34
    assert accuracy_score(truth, predicted) >= 0.85
    assert f1_score(truth, predicted, average="macro") >= 0.8
    # the reloaded checkpoint reproduces the scores the trained model wrote, cell for cell
    assert model.metadata.scores == {
        "accuracy": pytest.approx(accuracy_score(truth, predicted), abs=1e-12),
        "macro_f1": pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12),
        "n_cells": len(cells),
        "annotation": "constrained",
        "rerank": 0,  # trained for prediction only
    }


def test_temperature_fit_on_the_held_out_cells_calibrates_their_scores(trained):
    """One temperature for the prediction alone (no generation to re-rank by): the best for the held-out cells."""
    adata, _, path = trained
    model = load(path)
    assert list(model.metadata.score_temperatures) == ["0"]
    temperature = model.metadata.score_temperatures["0"]
    cells = held_out(adata, model.metadata)
    words = _utils.cell_words(cells, model, n_genes=N_GENES, mod=None)
    kwargs = {"n_genes": N_GENES, "organism": "Homo sapiens", "rerank": None, "batch_size": 8}
    (loglik,) = label_loglik(model, words, model.metadata.labels, **kwargs).values()
    truth = [model.metadata.labels.index(label) for label in cells.obs["cell_type"]]

    def nll(t: float) -> float:
        return -float(log_softmax(loglik / t, axis=1)[np.arange(len(truth)), truth].mean())

    # a minimum of the held-out negative log-likelihood (or the floor of 1), recorded to 4 decimals
    assert temperature >= 1
    assert nll(temperature) <= nll(temperature * 1.01) + 1e-9
    assert temperature == 1 or nll(temperature) <= nll(temperature / 1.01) + 1e-9
    # annotate applies it
    sc_c2s.tl.annotate(cells, model=model, labels="model", n_genes=N_GENES)
    best = loglik.argmax(axis=1)
    calibrated = softmax(loglik / temperature, axis=1)[np.arange(len(best)), best]
    np.testing.assert_allclose(cells.obs["c2s_cell_type_score"], calibrated, rtol=1e-5)


def test_demo_model_records_what_finetune_computes_on_its_held_out_cells(_pbmc68k):
    """Its scores and temperatures, recomputed rather than retrained (docs/contributing.md), are finetune's."""
    model = load("demo")
    adata = _pbmc68k.copy()
    sc_c2s.pp.to_sentences(adata)
    cells = adata.obs_names.get_indexer(model.metadata.training["eval_obs_names"])
    labels = adata.obs["bulk_labels"]
    scores, temperatures = _evaluate(model, DataHandler(adata), adata.uns["c2s"], cells, labels, n_genes=200)
    assert scores == model.metadata.scores
    assert temperatures == model.metadata.score_temperatures


def test_reloaded_checkpoint_gives_identical_predictions(trained):
    adata, _, path = trained
    results = []
    for _ in range(2):
        cells = held_out(adata, load(path).metadata)
        sc_c2s.tl.annotate(cells, model=load(path), labels="model", n_genes=N_GENES)
        results.append(cells.obs[["c2s_cell_type", "c2s_cell_type_score"]])
    pd.testing.assert_frame_equal(*results)


def test_checkpoint_metadata(trained):
    adata, _, path = trained
    assert {"config.json", "model.safetensors", "tokenizer.json", METADATA_FILE} <= {p.name for p in path.iterdir()}
    metadata = C2SMetadata.read(path)
    assert metadata.name == "model"
    assert metadata.prompt_style == "c2s"
    assert metadata.tasks == ["cell_type_prediction"]
    assert metadata.organism == "Homo sapiens"
    assert metadata.upper_case is True
    assert metadata.n_genes == N_GENES
    assert metadata.labels == sorted(adata.obs["cell_type"].unique())
    ranked = adata.obsm["c2s_genes"]
    assert metadata.vocabulary == list(adata.uns["c2s"]["genes"][np.unique(ranked[ranked >= 0])])
    assert metadata.rank_fit == pytest.approx(adata.uns["c2s"]["rank_fit"])
    assert metadata.temperature is None  # chosen for generation models only
    training = metadata.training
    assert training["base_model"] == "scratch"
    assert training["label_key"] == "cell_type"
    assert (training["epochs"], training["batch_size"], training["random_state"]) == (6, 16, 0)
    assert training["gene_dropout"] == 0.1
    assert training["n_train_cells"] + len(training["eval_obs_names"]) == adata.n_obs
    assert training["n_samples"] == training["n_train_cells"]
    assert training["n_truncated"] == 0
    assert len(training["loss"]) == 6
    assert training["loss"][-1] < training["loss"][0] / 4
    # the stored held-out cells are the seeded stratified split
    is_eval = split(adata.obs["cell_type"].astype(str), eval_fraction=EVAL_FRACTION, random_state=0)
    assert training["eval_obs_names"] == adata.obs_names[is_eval].tolist()
    json.loads((path / METADATA_FILE).read_text())


def test_training_leaves_the_data_untouched(trained):
    adata, before, _ = trained
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert set(adata.obsm) == set(before.obsm)
    assert set(adata.uns) == set(before.uns)
    np.testing.assert_array_equal(adata.obsm["c2s_genes"], before.obsm["c2s_genes"])
    assert (adata.X != before.X).nnz == 0


def test_finetune_a_checkpoint_further(trained, tmp_path, scanpy_log):
    """It also warned that `merge=True`, which the user never passed, folds adapters, not whole models. The base's
    sampling temperature and prompt style survived: generate sampled at a temperature chosen for the base's weights
    (without the MMDs that chose it), and a base of the first C2S release's prompts left its style on a model
    trained in today's, so every verb warned that the model was not trained for its prompts."""
    adata, _, path = trained
    base = shutil.copytree(path, tmp_path / "base")
    metadata = C2SMetadata.read(base)
    metadata.temperature, metadata.prompt_style = 0.5, "c2s-legacy"
    metadata.write(base)
    out = sc_c2s.tl.finetune(
        adata,
        label_key="cell_type",
        base_model=base,
        output_dir=tmp_path / "again",
        tasks="cell_type_prediction",
        n_genes=N_GENES,
        epochs=1,
        eval_fraction=EVAL_FRACTION,
        random_state=1,
    )
    assert "merge" not in scanpy_log.getvalue()
    metadata = load(out).metadata
    assert metadata.training["base_model"] == str(base)
    assert (metadata.temperature, metadata.prompt_style) == (None, "c2s")
    assert metadata.training["learning_rate"] == 5e-5
    assert metadata.tasks == ["cell_type_prediction"]
    assert metadata.scores["accuracy"] >= 0.85


@pytest.mark.parametrize("task", ["cell_type_prediction", "cell_type_generation"])
def test_sentences_longer_than_the_base_model_reads_are_refused_before_training(trained, tmp_path, monkeypatch, task):
    """Continuing from a model trained from scratch on shorter sentences, with finetune's default of 200 genes,
    trained the whole budget, then failed annotating the held-out cells or choosing the sampling temperature, and
    kept nothing. It is refused before training; the most genes it names train, one more is refused."""
    adata, _, path = trained
    longer = adata.copy()
    sc_c2s.pp.to_sentences(longer, gene_symbols="gene_symbol", n_genes=200)
    kwargs = {"label_key": "cell_type", "base_model": path, "tasks": (task,), "max_steps": 1, "patience": None}
    with monkeypatch.context() as patch:
        patch.setattr(_trainer, "train", lambda *args, **kwargs: pytest.fail("trained"))
        with pytest.raises(ValueError, match=r"ask for at most `n_genes=(\d+)`") as info:
            sc_c2s.tl.finetune(longer, output_dir=tmp_path / "m", **kwargs)
        assert not (tmp_path / "m").exists()
        fit = int(re.search(r"n_genes=(\d+)", str(info.value))[1])
        assert N_GENES <= fit < 200
        with pytest.raises(ValueError, match=r"ask for at most `n_genes="):
            sc_c2s.tl.finetune(longer, output_dir=tmp_path / "m", n_genes=fit + 1, **kwargs)
    assert load(sc_c2s.tl.finetune(longer, output_dir=tmp_path / "m", n_genes=fit, **kwargs)).metadata.n_genes == fit


def test_data_of_genes_the_base_model_cannot_write_is_refused_before_training(trained, tmp_path, monkeypatch):
    """Trained for prediction only, the model trained its whole budget on unknown words, then failed reading the
    held-out cells and kept nothing; with generation, it was refused, in generate's words."""
    adata, _, path = trained
    renamed = adata.copy()
    renamed.var["gene_symbol"] = "NEW" + renamed.var["gene_symbol"].astype(str)
    sc_c2s.pp.to_sentences(renamed, gene_symbols="gene_symbol", n_genes=N_GENES)
    monkeypatch.setattr(_trainer, "train", lambda *args, **kwargs: pytest.fail("trained"))
    for tasks in ["cell_type_prediction", ("cell_type_prediction", "cell_type_generation")]:
        with pytest.raises(ValueError, match=r"None of the genes of the sentences \(e\.g\. 'NEW.*'\) is a word of "):
            sc_c2s.tl.finetune(
                renamed, label_key="cell_type", base_model=path, output_dir=tmp_path / "m", tasks=tasks, n_genes=N_GENES
            )
        assert not (tmp_path / "m").exists()


def test_base_model_must_know_the_labels(trained, tmp_path):
    adata, _, path = trained
    adata = adata.copy()
    adata.obs["renamed"] = "line " + adata.obs["cell_type"].astype(str)
    with pytest.raises(ValueError, match=r"has no words for the names \['line A549', 'line H1975', "):
        sc_c2s.tl.finetune(adata, label_key="renamed", base_model=path, output_dir=tmp_path / "m", n_genes=N_GENES)
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_trained_further_lists_the_genes_it_can_write(sentences, tmp_path, monkeypatch):
    """Its vocabulary listed the new data's genes, also those its tokenizer of whole words cannot write, so annotate
    never warned of them; it now keeps the genes it knew beside the new ones it spells. The record names the base
    by its full path, the folder "." by its name, and the evaluation interval."""
    base = one_step(sentences, tmp_path / "base")
    known = load(base).metadata.vocabulary
    adata = sentences.copy()
    adata.var["gene_symbol"] = adata.var["gene_symbol"].replace({known[0]: "NOVEL1"})
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=8)
    assert "NOVEL1" in set(adata.uns["c2s"]["genes"][np.unique(adata.obsm["c2s_genes"])])
    (tmp_path / "further").mkdir()
    monkeypatch.chdir(tmp_path / "further")
    path = sc_c2s.tl.finetune(
        adata,
        label_key="cell_type",
        base_model=os.path.relpath(base),
        output_dir=".",
        tasks=("cell_type_prediction",),
        max_steps=2,
        eval_every=1,
    )
    metadata = load(path).metadata
    assert metadata.vocabulary == known  # known[0] is still a word of the tokenizer
    assert (metadata.name, metadata.training["base_model"]) == ("further", str(base.resolve()))
    assert metadata.training["eval_every"] == 1
    assert [point["step"] for point in metadata.training["curve"]] == [1, 2]


def test_mudata(_cellbench, tmp_path):
    adata = _cellbench[:60].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=8)
    mdata = md.MuData({"rna": adata})
    path = sc_c2s.tl.finetune(
        mdata, label_key="cell_type", base_model="scratch", output_dir=tmp_path / "m", n_genes=8, epochs=1
    )
    metadata = load(path).metadata
    is_eval = split(adata.obs["cell_type"].astype(str), eval_fraction=0.1, random_state=0)
    assert metadata.training["eval_obs_names"] == adata.obs_names[is_eval].tolist()
    assert metadata.labels == sorted(adata.obs["cell_type"].unique())
    # both tasks by default: one sample of each per training cell
    assert metadata.tasks == ["cell_type_prediction", "cell_type_generation"]
    assert metadata.training["n_samples"] == 2 * (adata.n_obs - is_eval.sum())


def test_finetune_chooses_the_temperature_whose_cells_come_closest_to_the_real_ones(_cellbench, tmp_path):
    adata = _cellbench[:60].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=8)
    path = sc_c2s.tl.finetune(
        adata, label_key="cell_type", base_model="scratch", output_dir=tmp_path / "m", n_genes=8, epochs=1
    )
    model = load(path)
    mmd = model.metadata.training["temperature_mmd"]
    assert list(mmd) == ["1.0", "0.7", "0.5"]
    assert model.metadata.temperature == float(min(mmd, key=mmd.get))
    # each figure is score_generation's MMD for 200 cells generated at that temperature, shared among the types as
    # the cells are (at least 4 each)
    counts = adata.obs["cell_type"].astype(str).value_counts().sort_index()
    request = {t: max(4, round(200 * n / counts.sum())) for t, n in counts[counts >= 4].items()}
    for temperature, expected in mmd.items():
        generated = sc_c2s.tl.generate(
            adata, model=model, cell_types=request, n_genes=8, temperature=float(temperature)
        )
        table = sc_c2s.tl.score_generation(adata, generated, label_key="cell_type")
        assert table.loc["overall", "mmd"] == pytest.approx(expected, abs=1e-5)
    # generate samples at the model's temperature unless given one
    kwargs = {"model": model, "cell_types": {"A549": 2}, "n_genes": 8}
    assert sc_c2s.tl.generate(adata, **kwargs).uns["c2s_generate"]["params"]["temperature"] == (
        model.metadata.temperature
    )
    assert sc_c2s.tl.generate(adata, **kwargs, temperature=1.0).uns["c2s_generate"]["params"]["temperature"] == 1.0


@pytest.fixture(scope="module")
def generator(_cellbench, tmp_path_factory, one_torch_thread):
    """A tiny model trained for generation only on 8-gene sentences (finetune's `n_genes` left at 200).

    With the genes per cell that generate asked for while finetune chose the temperature, and what scanpy logged.
    """
    adata = _cellbench[:60].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=8)
    calls, generate = [], _generate.generate

    def record(*args, **kwargs):
        generated = generate(*args, **kwargs)
        calls.append(generated.uns["c2s_generate"]["params"]["n_genes"])
        return generated

    with pytest.MonkeyPatch.context() as patch, captured_log("info") as log:
        patch.setattr(_generate, "generate", record)
        path = sc_c2s.tl.finetune(
            adata,
            label_key="cell_type",
            base_model="scratch",
            output_dir=tmp_path_factory.mktemp("generator") / "m",
            tasks=["cell_type_generation"],
            max_steps=2,
        )
    return path, calls, log.getvalue()


def test_a_model_not_trained_to_annotate_gets_no_annotation_scores(generator):
    """Its held-out cells were annotated anyway: chance-level scores of a task it never learnt, logged as its own."""
    path, _, log = generator
    metadata = load(path).metadata
    assert metadata.scores == {}
    assert len(metadata.training["eval_obs_names"]) == 6  # the held-out cells still select the model
    assert "held out:" not in log


def test_the_temperature_is_chosen_on_cells_as_long_as_the_training_sentences(generator):
    """It generated finetune's `n_genes` (200) genes per cell, compared with 8-gene real cells, warning thrice."""
    path, calls, log = generator
    assert load(path).metadata.n_genes == 8
    assert calls == [8, 8, 8]
    assert "n_genes" not in log


def test_a_generator_trains_with_any_seed_finetune_takes(_cellbench, tmp_path):
    """Seeds from 2**32 on (those `random_state=None` and Generators draw, nearly always) failed after training,
    where the temperature's cells were scored, and no checkpoint was written."""
    adata = _cellbench[:60].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=8)
    path = sc_c2s.tl.finetune(
        adata,
        label_key="cell_type",
        base_model="scratch",
        output_dir=tmp_path / "m",
        tasks=["cell_type_generation"],
        max_steps=1,
        random_state=2**40,
    )
    training = load(path).metadata.training
    assert training["random_state"] == 2**40
    assert list(training["temperature_mmd"]) == ["1.0", "0.7", "0.5"]


def test_a_generator_of_one_cell_type_trains(_cellbench, tmp_path):
    """Generation alone was refused with a single label ("a classifier needs at least two"), though it trains no
    classifier: a generator of one population could not be trained."""
    adata = _cellbench[_cellbench.obs["cell_type"] == "A549"][:40].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=8)
    args = {"label_key": "cell_type", "base_model": "scratch", "max_steps": 1}
    with pytest.raises(ValueError, match=r"single label \('A549'\).*tasks=\[\"cell_type_generation\"\]`\.$"):
        sc_c2s.tl.finetune(adata, output_dir=tmp_path / "both", **args)
    path = sc_c2s.tl.finetune(adata, output_dir=tmp_path / "m", tasks=["cell_type_generation"], **args)
    model = load(path)
    assert model.metadata.labels == ["A549"]
    generated = sc_c2s.tl.generate(adata, model=model, cell_types={"A549": 3})
    assert generated.obs["n_valid_genes"].tolist() == [8, 8, 8]


def test_training_on_the_cpu_seeds_no_other_device(sentences, tmp_path, monkeypatch):
    """`torch.manual_seed` queued our seed for CUDA, replacing the caller's, and seeded MPS; neither was given back."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(("cuda", seed)))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: seeded.append(("mps", seed)))
    torch.manual_seed(5)  # the caller's
    seeded.clear()
    expected = torch.rand(3, generator=torch.Generator().manual_seed(5))  # the caller's next draw
    one_step(sentences, tmp_path / "m", device="cpu")
    assert seeded == []
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("device", ["cuda", "mps", "xpu"])
def test_training_seeds_the_device_it_runs_on(monkeypatch, device):
    """Seeding only the CPU and CUDA left the dropout of training on other accelerators unseeded."""
    seeded = []
    backend = getattr(torch, device)
    name = "manual_seed_all" if hasattr(backend, "manual_seed_all") else "manual_seed"
    monkeypatch.setattr(backend, name, seeded.append)
    _runtime.seed_torch(7, torch.device(device))
    assert seeded == [7]
    torch.testing.assert_close(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_training_gives_the_random_state_of_mps_and_xpu_back(monkeypatch, device):
    """Only the CPU's and CUDA's were given back: training on MPS left the caller's MPS generator at our seed."""
    state = {"seed": 5}  # the caller's, on a stand-in for the device's generator
    backend = getattr(torch, device)
    if device == "mps":
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        monkeypatch.setattr(backend, "get_rng_state", lambda: dict(state))
        monkeypatch.setattr(backend, "set_rng_state", lambda saved: state.update(saved))
        monkeypatch.setattr(backend, "manual_seed", lambda seed: state.update(seed=seed))
    else:
        monkeypatch.setattr(backend, "is_initialized", lambda: True)
        monkeypatch.setattr(backend, "get_rng_state_all", lambda: dict(state))
        monkeypatch.setattr(backend, "set_rng_state_all", lambda saved: state.update(saved))
        monkeypatch.setattr(backend, "manual_seed_all", lambda seed: state.update(seed=seed))
    with _runtime.keep_random_state():
        _runtime.seed_torch(7, torch.device(device))
        assert state == {"seed": 7}
    assert state == {"seed": 5}


@pytest.mark.parametrize("made_before", [False, True], ids=["new folders", "empty folder"])
def test_a_failed_save_leaves_no_half_checkpoint(sentences, tmp_path, monkeypatch, made_before):
    """A full disk (or Ctrl-C) while saving left weights without metadata: they loaded with the defaults, and the
    same call again refused the folder, no longer empty."""
    output_dir = tmp_path / "runs" / "m"
    if made_before:
        output_dir.mkdir(parents=True)

    def full_disk(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C2SMetadata, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        one_step(sentences, output_dir)
    if made_before:
        assert list(output_dir.iterdir()) == []
    else:
        assert not (tmp_path / "runs").exists()  # nor the folder made for it


def test_prompts_ask_about_the_genes_the_sentences_hold(sentences, tmp_path, monkeypatch):
    """8-gene sentences, finetune's `n_genes` left at 200: training and the held-out scores and temperatures asked
    about 200 genes, while annotate asks the model about its `n_genes`, 8."""
    asked, prediction = [], prompts.cell_type_prediction

    def record(*args, **kwargs):
        asked.append(kwargs["n_genes"])
        return prediction(*args, **kwargs)

    monkeypatch.setattr(prompts, "cell_type_prediction", record)
    path = sc_c2s.tl.finetune(
        sentences,
        label_key="cell_type",
        base_model="scratch",
        output_dir=tmp_path / "m",
        tasks=("cell_type_prediction",),
        max_steps=1,
    )
    assert load(path).metadata.n_genes == 8
    assert set(asked) == {8}


# --- model selection on the held-out cells


def held_out_losses(model, samples: _trainer.Samples, pad_id: int) -> np.ndarray:
    """Answer loss of each of `samples`, one at a time (no padding), with dropout off."""
    model.eval()
    with torch.no_grad():
        return np.array(
            [_trainer.sample_loss(model, _trainer.collate(samples, [i], pad_id)).item() for i in range(len(samples))]
        )


def test_checkpoint_keeps_the_best_weights_of_its_curve(trained):
    adata, _, path = trained
    model = load(path)
    training = model.metadata.training
    curve = training["curve"]
    steps = [point["step"] for point in curve]
    assert steps == sorted(steps) and steps[-1] == training["steps"]
    assert training["stopped"] in {"max_steps", "patience"}
    # the best label accuracy, the latest evaluation among equals
    best = max(reversed(curve), key=lambda point: point["score"])
    assert training["best_step"] == best["step"]
    assert set(best["loss"]) == set(best["accuracy"]) == {"cell_type_prediction"}
    assert best["score"] == best["accuracy"]["cell_type_prediction"]
    # the saved weights are those of the best evaluation: every held-out cell was scored (60 cells, 5 labels), as
    # constrained annotation scores them, so the selected accuracy is the checkpoint's held-out accuracy
    assert best["score"] == pytest.approx(model.metadata.scores["accuracy"], abs=5e-6)  # the curve keeps 5 decimals
    # and the loss is the true answer's mean token loss (" label.", no EOS), recomputed from whole samples
    cells = held_out(adata, model.metadata)
    words = [cells.uns["c2s"]["genes"][row[row >= 0]].tolist() for row in cells.obsm["c2s_genes"]]
    kwargs = {"tasks": ("cell_type_prediction",), "organism": "Homo sapiens", "upper": True, "max_length": 500}
    samples = _samples.encode(model.tokenizer, words, cells.obs["cell_type"].astype(str).tolist(), **kwargs)
    without_eos = _trainer.Samples([ids[:-1] for ids in samples.input_ids], samples.n_prompt)
    losses = held_out_losses(model.model, without_eos, model.tokenizer.pad_token_id)
    assert losses.mean() == pytest.approx(best["loss"]["cell_type_prediction"], abs=2e-4)


@pytest.fixture(scope="module")
def cell_samples(_cellbench):
    """Prediction samples of 120 CellBench cells for training, and of 60 held out under every label."""
    adata = _cellbench[:180].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=N_GENES)
    words = [adata.uns["c2s"]["genes"][row[row >= 0]].tolist() for row in adata.obsm["c2s_genes"]]
    labels = adata.obs["cell_type"].astype(str).tolist()
    label_set = sorted(set(labels))
    tokenizer = build_tokenizer([w.upper() for ws in words for w in ws], label_set, max_genes=N_GENES)
    kwargs = {"tasks": ("cell_type_prediction",), "organism": "Homo sapiens", "upper": True, "max_length": 100}
    train = _samples.encode(tokenizer, words[:120], labels[:120], **kwargs)
    held = _trainer.Choices(
        [_samples.encode(tokenizer, words[120:], [label] * 60, **kwargs) for label in label_set],
        np.array([label_set.index(label) for label in labels[120:]]),
    )
    return tokenizer, train, {"cell_type_prediction": held}


def small_model(tokenizer):
    """A scratch model of one layer, small enough to train in a test."""
    return build_model(tokenizer, hidden_size=16, n_layers=1, n_heads=2)


def train_small(model, cell_samples, **options) -> _trainer.Result:
    """Train `model` on the training samples of `cell_samples` in batches of 8 at learning rate 1e-3."""
    tokenizer, train, _ = cell_samples
    return _trainer.train(model, train, batch_size=8, learning_rate=1e-3, pad_id=tokenizer.pad_token_id, **options)


@pytest.mark.skipif(torch.__version__ < "2.4", reason="AdamW's fused kernel runs on the CPU from torch 2.4")
def test_the_fused_optimiser_trains_as_the_plain_one(cell_samples, monkeypatch):
    """On the CPU (torch >= 2.4), AdamW's fused kernel updates the weights as its ten separate passes do."""
    tokenizer = cell_samples[0]
    weights = {}
    for fused in (True, False):
        monkeypatch.setattr(_trainer, "fused_adamw", lambda device, fused=fused: fused)
        model = small_model(tokenizer)
        train_small(model, cell_samples, max_steps=20)
        weights[fused] = {name: p.detach() for name, p in model.named_parameters()}
    before = dict(small_model(tokenizer).named_parameters())
    for name, fused in weights[True].items():
        assert not torch.equal(fused, before[name])
        torch.testing.assert_close(fused, weights[False][name], rtol=1e-4, atol=1e-5)


def test_early_stopping_stops_and_restores_the_best_weights(cell_samples, monkeypatch):
    tokenizer, _, held = cell_samples
    model = small_model(tokenizer)
    # scripted accuracies: 0.2, 0.6, 0.6 (equal: the later weights are kept), then three evaluations below
    truth = held["cell_type_prediction"].truth
    accuracies = iter([0.2, 0.6, 0.6, 0.4, 0.6 - 1 / 60, 0.2, 1.0])
    weights, right = [], {}

    def losses(scored, samples, **kwargs):
        if samples is held["cell_type_prediction"].samples[0]:  # once per evaluation: a table of labels × cells
            n_right = round(next(accuracies) * len(truth))
            right["cells"] = np.arange(len(truth)) < n_right
            weights.append({n: p.detach().clone() for n, p in scored.named_parameters()})
        label = next(i for i, s in enumerate(held["cell_type_prediction"].samples) if s is samples)
        # the true label scores 1 where the cell is right, 3 where it is wrong; every other label 2
        return np.where(truth == label, np.where(right["cells"], 1.0, 3.0), 2.0)

    monkeypatch.setattr(_trainer, "answer_losses", losses)
    result = train_small(model, cell_samples, max_steps=200, held_out=held, eval_every=5, patience=3)
    assert result.stopped == "patience"
    assert [point["score"] for point in result.curve] == pytest.approx(
        [0.2, 0.6, 0.6, 0.4, 0.6 - 1 / 60, 0.2], abs=1e-5
    )
    assert (result.steps, result.best_step) == (30, 15)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[2][name], rtol=0, atol=0)
    assert not torch.equal(weights[1]["gpt_neox.embed_in.weight"], weights[2]["gpt_neox.embed_in.weight"])
    assert model.training is False


def test_selection_takes_equal_scores_as_equal(monkeypatch):
    """Two tasks' accuracies averaged: the same number of cells right, split otherwise between the tasks, scored an
    ulp below the best (1/30 + 5/30 against 0 + 6/30), so older weights were kept and patience counted."""
    held = {task: SimpleNamespace(truth=np.zeros(30, dtype=int)) for task in ("prediction", "generation")}
    selection = _trainer._Selection(torch.nn.Linear(2, 2), held, batch_size=1, pad_id=0)
    n_right = iter([0, 6, 1, 5, 5, 1])
    monkeypatch.setattr(selection, "_scores", lambda _: (np.zeros(30), np.arange(30) >= next(n_right)))
    for step in (5, 10, 15):
        selection.evaluate(step, start=0.0)
    assert (selection.best_step, selection.since_best) == (15, 0)


def test_selection_scores_the_true_label_against_the_others(cell_samples):
    tokenizer, _, held = cell_samples
    model = small_model(tokenizer)
    result = train_small(model, cell_samples, max_steps=1, held_out=held)
    # one evaluation, recomputed sample by sample: the loss of the true labels, the share of cells they win
    choices = held["cell_type_prediction"]
    table = np.stack([held_out_losses(model, s, tokenizer.pad_token_id) for s in choices.samples])
    (point,) = result.curve
    cells = np.arange(len(choices.truth))
    assert point["loss"]["cell_type_prediction"] == pytest.approx(table[choices.truth, cells].mean(), abs=2e-4)
    assert point["score"] == pytest.approx(np.mean(table.argmin(0) == choices.truth), abs=1e-5)


@pytest.mark.parametrize("rows", [None, 1], ids=["whole batches", "one sample per part"])
def test_answer_losses_match_one_sample_at_a_time(cell_samples, monkeypatch, rows):
    tokenizer, train, _ = cell_samples
    model = small_model(tokenizer)
    # long answers of 7 lengths: the prompts' last genes count as answer, as in generation samples
    samples = _trainer.Samples(train.input_ids[:40], train.n_prompt[:40] - 3 - np.arange(40) % 7)
    if rows is not None:  # logits of one sample's answer fit the budget, not two
        longest = max(len(ids) - n for ids, n in zip(samples.input_ids, samples.n_prompt, strict=True))
        monkeypatch.setattr(_candidates, "LOGIT_BUDGET", (longest + 1) * model.get_output_embeddings().out_features)
    pad = tokenizer.pad_token_id
    losses = _trainer.answer_losses(model, samples, batch_size=8, pad_id=pad)
    np.testing.assert_allclose(losses, held_out_losses(model, samples, pad), rtol=1e-5)


def test_selection_reads_each_prompt_once_for_all_labels(cell_samples):
    tokenizer, _, held = cell_samples
    choices = held["cell_type_prediction"]
    # the same cells and labels as prompts read once and the labels' answers (" label.", no EOS)
    first = choices.samples[0]
    answers = [s.input_ids[0][s.n_prompt[0] : -1].tolist() for s in choices.samples]
    cell_prompts = [ids[:n] for ids, n in zip(first.input_ids, first.n_prompt, strict=True)]
    answer_held = {"cell_type_prediction": _trainer.Answers(cell_prompts, answers, choices.truth)}
    model = small_model(tokenizer)
    result = train_small(model, cell_samples, max_steps=1, held_out=answer_held)
    # recomputed from whole samples without their EOS, one at a time: summed answer loss of each label and cell
    pad = tokenizer.pad_token_id
    n_tokens = np.array([len(ids) for ids in answers])
    table = np.stack(
        [
            held_out_losses(model, _trainer.Samples([ids[:-1] for ids in s.input_ids], s.n_prompt), pad) * n
            for s, n in zip(choices.samples, n_tokens, strict=True)
        ]
    )
    (point,) = result.curve
    cells = np.arange(len(choices.truth))
    true_loss = table[choices.truth, cells] / n_tokens[choices.truth]
    assert point["loss"]["cell_type_prediction"] == pytest.approx(true_loss.mean(), abs=2e-4)
    assert point["score"] == pytest.approx(np.mean(table.argmin(0) == choices.truth), abs=1e-5)
    assert 0 < point["score"] < 1


def test_max_time_stops_after_the_current_step(cell_samples):
    tokenizer, _, held = cell_samples
    result = train_small(small_model(tokenizer), cell_samples, max_steps=100, held_out=held, max_time=1e-6)
    # one step, then an evaluation of it, whose weights are kept
    assert (result.stopped, result.steps, result.best_step, len(result.loss)) == ("max_time", 1, 1, 1)
    assert [point["step"] for point in result.curve] == [1]


def test_without_held_out_cells_the_whole_budget_trains(cell_samples):
    tokenizer, _, _ = cell_samples
    result = train_small(small_model(tokenizer), cell_samples, max_steps=20, patience=1)
    # 15 steps per epoch: a whole epoch and a third of one
    assert (result.stopped, result.steps, result.curve, result.best_step, len(result.loss)) == (
        "max_steps",
        20,
        [],
        None,
        2,
    )


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_masks_drop_the_share_asked_for(p):
    torch.manual_seed(0)
    keep = _dropout.keep_mask((2000, 2000), p)
    assert keep.dtype == torch.bool
    assert keep.shape == (2000, 2000)
    assert abs((~keep).float().mean().item() - p) < 1e-3  # 4e6 draws: the standard error is below 2.5e-4
    for axis in (0, 1):  # no row or column pattern from the four masks drawn per random number
        assert (~keep).float().mean(axis).std().item() < 5 * math.sqrt(p * (1 - p) / 2000)


def test_cpu_dropout_in_training_only_and_restored_after():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.25), torch.nn.Dropout(0.0))
    x = torch.ones(1000, 4)
    with _dropout.cpu_dropout(model):
        assert "forward" in vars(model[1]) and "forward" not in vars(model[2])  # p = 0 is left alone
        model.train()
        out = model[1](x)
        assert out.unique().tolist() == pytest.approx([0.0, 4 / 3])  # dropped, or scaled by 1 / (1 - p)
        model.eval()
        assert model[1](x) is x
    assert "forward" not in vars(model[1])


def test_counts_the_tokens_trained_on(cell_samples):
    tokenizer, train, _ = cell_samples
    per_epoch = sum(len(ids) for ids in train.input_ids)  # 120 samples: 15 steps of 8
    assert train_small(small_model(tokenizer), cell_samples, max_steps=15).n_tokens == per_epoch
    assert train_small(small_model(tokenizer), cell_samples, max_steps=30).n_tokens == 2 * per_epoch


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 2400),  # from scratch, whatever the number of samples
        ({"n_samples": 320_000}, 2400),
        ({"epochs": 2}, 8),
        ({"epochs": 2, "max_steps": 5}, 5),
        ({"max_steps": 5000}, 5000),
        ({"scratch": False}, 12),  # 3 passes
    ],
)
def test_budget(kwargs, expected):
    assert _trainer.budget(**{"n_samples": 100, "batch_size": 32, **kwargs}) == expected


# --- the split and the scores


def test_split_is_seeded_and_stratified():
    labels = pd.Series(["a"] * 50 + ["b"] * 20 + ["c"] * 3 + ["d"])
    is_eval = split(labels, eval_fraction=0.2, random_state=0)
    np.testing.assert_array_equal(is_eval, split(labels, eval_fraction=0.2, random_state=0))
    assert not np.array_equal(is_eval, split(labels, eval_fraction=0.2, random_state=1))
    # round(0.2 * n) per label, and a label with one cell keeps it for training
    assert labels[is_eval].value_counts().to_dict() == {"a": 10, "b": 4, "c": 1}
    assert not split(labels, eval_fraction=0.0).any()
    # every label keeps a training cell even when nearly all are held out
    assert (labels[~split(labels, eval_fraction=0.99)].value_counts() == 1).all()


def test_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    truth = rng.choice(["a", "b", "c", "d"], 200)
    predicted = np.where(rng.random(200) < 0.7, truth, rng.choice(["a", "b", "e"], 200))
    result = scores(truth, predicted)
    assert result["accuracy"] == accuracy_score(truth, predicted)
    assert result["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12)


# --- samples at token level


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["CD3D", "IL7R", "LTB", "MS4A1", "CD79A"], ["T cell", "B cell"], max_genes=10)


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_samples_mask_the_prompt_and_end_with_eos(tokenizer):
    words = [["CD3D", "IL7R", "LTB"], ["MS4A1", "CD79A"]]
    samples = _samples.encode(
        tokenizer,
        words,
        ["T cell", "B cell"],
        tasks=("cell_type_prediction", "cell_type_generation"),
        organism="Homo sapiens",
        upper=True,
        max_length=200,
    )
    assert len(samples) == 4 and samples.n_truncated == 0
    prompt = prompts.cell_type_prediction(words[0], organism="Homo sapiens")
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert samples.n_prompt[0] == n_prompt
    assert tokens(tokenizer, samples.input_ids[0][n_prompt:]) == ["T", "cell", ".", "[EOS]"]
    labels = samples.labels(0)
    assert (labels[:n_prompt] == _trainer.IGNORE_INDEX).all()
    np.testing.assert_array_equal(labels[n_prompt:], samples.input_ids[0][n_prompt:])
    # generation: the label is in the prompt, the sentence is the answer
    generation = tokens(tokenizer, samples.input_ids[3])
    assert generation[: samples.n_prompt[3]][-8:] == ["cell", "type", "B", "cell", ".", "Cell", "sentence", ":"]
    assert generation[samples.n_prompt[3] :] == ["MS4A1", "CD79A", ".", "[EOS]"]
    assert "2" in generation[: samples.n_prompt[3]]


def test_batches_pad_left_and_keep_eos_in_the_loss(tokenizer):
    samples = _samples.encode(
        tokenizer,
        [["CD3D", "IL7R", "LTB"], ["MS4A1"]],
        ["T cell", "B"],
        tasks=("cell_type_prediction",),
        organism="Homo sapiens",
        upper=True,
        max_length=200,
    )
    batch = _trainer.collate(samples, [0, 1], tokenizer.pad_token_id)
    n_long, n_short = (len(ids) for ids in samples.input_ids)
    assert n_long == n_short + 3  # two genes and one label word more
    np.testing.assert_array_equal(batch["attention_mask"][1], [0] * 3 + [1] * n_short)
    np.testing.assert_array_equal(batch["input_ids"][1, :3], [tokenizer.pad_token_id] * 3)
    np.testing.assert_array_equal(batch["position_ids"][1, 3:], np.arange(n_short))
    np.testing.assert_array_equal(batch["position_ids"][0], np.arange(n_long))
    for row in range(2):
        targets = batch["labels"][row][batch["labels"][row] != _trainer.IGNORE_INDEX]
        assert tokens(tokenizer, targets)[-2:] == [".", "[EOS]"]
        assert batch["attention_mask"][row, -1] == 1
    # the loss of the padded batch is the mean of the unpadded samples' losses over their answer tokens (4 and 3)
    model = small_model(tokenizer).eval()
    with torch.no_grad():
        padded = _trainer.loss(model, batch).item()
        unpadded = [
            model(
                input_ids=torch.from_numpy(samples.input_ids[i])[None], labels=torch.from_numpy(samples.labels(i))[None]
            ).loss.item()
            for i in range(2)
        ]
    assert padded == pytest.approx(np.mean(unpadded), rel=1e-5)


def test_the_fused_training_loss_has_the_gradient_of_the_mean_answer_loss(tokenizer, monkeypatch):
    samples = _samples.encode(
        tokenizer,
        [["CD3D", "IL7R", "LTB"], ["MS4A1"]],
        ["T cell", "B"],
        tasks=("cell_type_prediction", "cell_type_generation"),
        organism="Homo sapiens",
        upper=True,
        max_length=200,
    )
    model = small_model(tokenizer).eval()  # no dropout: both passes see the same network
    calls = []
    fused = _output_loss.linear_cross_entropy
    monkeypatch.setattr(_output_loss, "linear_cross_entropy", lambda *args: calls.append(1) or fused(*args))
    batch = _trainer.collate(samples, range(len(samples)), tokenizer.pad_token_id)
    _trainer.loss(model, batch).backward()
    assert calls == [1]  # GPT-NeoX in float32 on the CPU takes the fused path
    gradients = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # Hugging Face's loss of each sample alone (unpadded: the mean over its answer tokens), averaged over samples
    expected = torch.stack(
        [
            model(
                input_ids=torch.from_numpy(samples.input_ids[i])[None], labels=torch.from_numpy(samples.labels(i))[None]
            ).loss
            for i in range(len(samples))
        ]
    ).mean()
    expected.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(gradients[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("task", ["cell_type_prediction", "cell_type_generation"])
def test_samples_longer_than_the_context_are_refused_naming_the_genes_that_fit(tokenizer, task):
    """They were cut to fit, so the model trained, then failed where annotation or generation read sentences of as
    many genes (see the test below)."""
    words = ["CD3D", "IL7R", "LTB", "MS4A1", "CD79A"]
    kwargs = {"tasks": (task,), "organism": "Homo sapiens", "upper": True}
    (full,) = _samples.encode(tokenizer, [words, words[:2]], ["T cell"] * 2, max_length=200, **kwargs).input_ids[:1]
    # one token per gene: three tokens fewer leave room for two genes
    limit = len(full) - 3
    with pytest.raises(
        ValueError,
        match=rf"^1 training sample is longer than the {limit} tokens .* has {len(full)}\); .* `n_genes=2`",
    ):
        _samples.encode(tokenizer, [words, words[:2]], ["T cell"] * 2, max_length=limit, **kwargs)
    with pytest.raises(ValueError, match=r"^2 held-out samples are longer than"):  # what finetune's selection reads
        _samples.encode(tokenizer, [words, words], ["T cell"] * 2, max_length=limit, what="held-out", **kwargs)
    (fits,) = _samples.encode(tokenizer, [words[:2]], ["T cell"], max_length=limit, **kwargs).input_ids
    assert len(fits) == limit


def test_gene_dropout_thins_prediction_sentences_only(tokenizer):
    words = [["CD3D", "IL7R", "LTB", "MS4A1", "CD79A"]] * 200
    samples = _samples.encode(
        tokenizer,
        words,
        ["T cell"] * 200,
        tasks=("cell_type_prediction", "cell_type_generation"),
        organism="Homo sapiens",
        upper=True,
        max_length=200,
        gene_dropout=0.4,
        rng=np.random.default_rng(0),
    )
    kept = []
    for i in range(0, len(samples), 2):
        text = tokens(tokenizer, samples.input_ids[i])
        sentence = text[text.index("sentence") + 2 : text.index("The", 5)]
        assert sentence[-1] == "." and 1 <= len(sentence) - 1 <= 5
        # the kept genes in their order, and the prompt counts them
        genes = sentence[:-1]
        assert genes == [g for g in words[0] if g in genes]
        assert text[text.index("of") + 1] == str(len(genes))
        assert text[samples.n_prompt[i] :] == ["T", "cell", ".", "[EOS]"]
        kept.append(len(genes))
        generation = tokens(tokenizer, samples.input_ids[i + 1])
        assert generation[samples.n_prompt[i + 1] :] == [*words[0], ".", "[EOS]"]
    # each of the 5 genes stays with probability 0.6
    assert np.mean(kept) == pytest.approx(3, abs=0.25)


@pytest.mark.parametrize(
    ("balance", "expected"),
    [
        (0.0, {"a": 90, "b": 9, "c": 1}),  # the data's proportions
        # square roots 9.49 : 3 : 1 of 100 draws: 70.3, 22.2, 7.4; the remainder to the largest fractions
        (0.5, {"a": 70, "b": 22, "c": 8}),
        (1.0, {"a": 34, "b": 33, "c": 33}),  # 33.3 each; the remainder to the first of the tied labels
    ],
)
def test_balanced_draw_shares(balance, expected):
    labels = np.array(["a"] * 90 + ["b"] * 9 + ["c"])
    picked = _samples.balanced(labels, balance=balance, rng=np.random.default_rng(0))
    assert len(picked) == len(labels)
    assert pd.Series(labels[picked]).value_counts().to_dict() == expected
    # a rare label's cells come equally often: all 9 cells of "b" twice, 4 of them a third time
    counts = np.bincount(picked, minlength=len(labels))
    if balance == 0.5:
        assert sorted(counts[90:99]) == [2] * 5 + [3] * 4
        assert counts[99] == 8
        assert counts[:90].max() == 1


def test_balanced_draw_is_seeded():
    labels = ["a"] * 50 + ["b"] * 5
    first, again, other = (
        _samples.balanced(labels, balance=0.5, rng=np.random.default_rng(seed)) for seed in (0, 0, 1)
    )
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def one_step(adata: ad.AnnData, output_dir: Path | str, **kwargs) -> Path:
    """Train cell-type prediction from scratch on 8-gene sentences for one step: enough to test checks and records."""
    return sc_c2s.tl.finetune(
        adata,
        label_key="cell_type",
        base_model="scratch",
        output_dir=output_dir,
        tasks=("cell_type_prediction",),
        n_genes=8,
        max_steps=1,
        **kwargs,
    )


def test_finetune_records_each_types_median_sentence_length(cellbench, tmp_path):
    """Of the training cells only (not the held-out ones), at most `n_genes`; generate asks each type for it."""
    adata = cellbench[:, :60].copy()  # 60 genes: cells express 27 to 60 of them, the median cell 45 to 55
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol")
    path = sc_c2s.tl.finetune(
        adata, label_key="cell_type", base_model="scratch", output_dir=tmp_path / "m", n_genes=55, max_steps=1
    )
    metadata = load(path).metadata
    train = ~adata.obs_names.isin(metadata.training["eval_obs_names"])
    lengths = np.minimum((adata.obsm["c2s_genes"] >= 0).sum(axis=1), 55)[train]
    labels = adata.obs["cell_type"].astype(str)[train]
    expected = {label: int(np.floor(np.median(lengths[labels == label]) + 0.5)) for label in sorted(set(labels))}
    assert metadata.sentence_lengths == expected
    assert min(expected.values()) < max(expected.values()) == 55  # one type at the cap


def test_finetune_draws_each_epoch_at_the_label_balance(sentences, tmp_path, monkeypatch):
    # an imbalanced training set: one cell line keeps 4 cells
    rare = sentences.obs["cell_type"].value_counts().index[-1]
    keep = (sentences.obs["cell_type"] != rare).to_numpy()
    keep[np.flatnonzero(~keep)[:4]] = True
    adata = sentences[keep].copy()
    epochs = []
    train = _trainer.train

    def record(model, samples, **kwargs):
        epochs.append(kwargs["resample"](np.random.default_rng(1)))
        return train(model, samples, **kwargs)

    monkeypatch.setattr(_trainer, "train", record)
    path = one_step(adata, tmp_path / "m", eval_fraction=0, balance_labels=1.0)
    model = load(path)
    assert model.metadata.training["balance_labels"] == 1.0
    # every label gets a fifth of an epoch's samples, whatever its size
    (samples,) = epochs
    answers = [
        " ".join(tokens(model.tokenizer, ids[n:-2])) for ids, n in zip(samples.input_ids, samples.n_prompt, strict=True)
    ]
    counts = pd.Series(answers).value_counts()
    assert len(samples) == adata.n_obs
    assert set(counts.index) == set(adata.obs["cell_type"])
    assert counts.max() - counts.min() <= 1
    assert counts[rare] > 4


def test_sample_without_room_for_its_answer(tokenizer):
    with pytest.raises(ValueError, match="without any gene"):
        _samples.encode(
            tokenizer,
            [["CD3D"]],
            ["T cell"],
            tasks=("cell_type_prediction",),
            organism="Homo sapiens",
            upper=True,
            max_length=10,
        )


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("T cells, CD4+", ["T", "cells", ",", "CD4+", "."]),
        # a label's own final mark stays on its last word: the answer's period is split off alone
        ("T cell.", ["T", "cell.", "."]),
        ("stage: G1:", ["stage", ":", "G1:", "."]),
        ("other...", ["other...", "."]),
    ],
)
def test_label_words_with_punctuation_are_known(label, expected):
    """Labels ending in a period or colon used to hold a word the scratch tokenizer did not know ("cell.")."""
    tokenizer = build_tokenizer(["CD4"], [label])
    ids = tokenizer(prompts.answer(label), add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokens(tokenizer, ids) == expected


# --- bad input


@pytest.fixture
def sentences(cellbench):
    sc_c2s.pp.to_sentences(cellbench, gene_symbols="gene_symbol", n_genes=8)
    return cellbench


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "match"),
    [
        (None, {"label_key": "missing"}, KeyError, "not a column of obs"),
        ("nan", {}, ValueError, "missing labels"),
        ("one", {}, ValueError, "single label"),
        ("multiline", {}, ValueError, "span several lines"),
        ("space", {}, ValueError, r"start or end with a space \(e.g. 'A549 '\)"),  # free answers are stripped
        (None, {"tasks": ("cell_type_prediction", "translation")}, ValueError, "tasks"),
        (None, {"tasks": ()}, ValueError, "tasks"),
        (None, {"tasks": None}, ValueError, "`tasks` must be a non-empty selection"),  # was a bare TypeError
        (None, {"eval_fraction": 1.0}, ValueError, "eval_fraction"),
        (None, {"gene_dropout": 1.0}, ValueError, "gene_dropout"),
        (None, {"n_genes": 0}, ValueError, "n_genes"),
        (None, {"gene_dropout": "0.1"}, ValueError, "gene_dropout"),
        (None, {"balance_labels": 1.5}, ValueError, "balance_labels"),
        (None, {"balance_labels": -0.1}, ValueError, "balance_labels"),
        (None, {"epochs": 0}, ValueError, "epochs"),
        (None, {"max_steps": 0}, ValueError, "max_steps"),
        (None, {"max_time": 0}, ValueError, "max_time"),
        (None, {"patience": 0}, ValueError, "patience"),
        (None, {"eval_every": 1.5}, ValueError, "eval_every"),
        (None, {"batch_size": -1}, ValueError, "batch_size"),
        (None, {"learning_rate": 0}, ValueError, "learning_rate"),
        (None, {"learning_rate": float("nan")}, ValueError, "learning_rate"),
        (None, {"random_state": -1}, ValueError, "random_state"),
        (None, {"device": "cuda:9"}, ValueError, "device"),
        (None, {"base_model": "scrach"}, ValueError, r"'scrach' is neither 'scratch', a checkpoint directory"),
        # data ranked apart and joined by `anndata.concat(uns_merge="same")`: refused once trained, a checkpoint
        # without metadata left behind
        ("joined", {"tasks": ("cell_type_prediction",), "max_steps": 1}, ValueError, r"A rank fit needs 'slope' a"),
    ],
)
def test_bad_input(sentences, container, tmp_path, change, kwargs, error, match):
    if change == "nan":
        sentences.obs.loc[sentences.obs_names[3], "cell_type"] = np.nan
    elif change == "one":
        sentences.obs["cell_type"] = "A549"
    elif change == "multiline":
        sentences.obs["cell_type"] = sentences.obs["cell_type"].astype(str).str.replace("A549", "A\n549")
    elif change == "space":
        labels = sentences.obs["cell_type"].astype(str).to_numpy()
        labels[np.flatnonzero(labels == "A549")[::2]] = "A549 "
        sentences.obs["cell_type"] = labels
    elif change == "joined":
        sentences.uns["c2s"]["rank_fit"] = {"n_cells": 60, "n_points": 59940, "input": "linear"}
    data = container.wrap(sentences)
    before = sentences.obs.copy()
    args = {"label_key": "cell_type", "base_model": "scratch", "output_dir": tmp_path / "m", **kwargs}
    with pytest.raises(error, match=match):
        sc_c2s.tl.finetune(data, **args)
    pd.testing.assert_frame_equal(sentences.obs, before)
    assert not (tmp_path / "m").exists()


def test_needs_sentences(cellbench, container, tmp_path):
    with pytest.raises(KeyError, match="to_sentences"):
        sc_c2s.tl.finetune(
            container.wrap(cellbench), label_key="cell_type", base_model="scratch", output_dir=tmp_path / "m"
        )
    assert "c2s" not in cellbench.uns


def test_refuses_a_non_empty_output_dir(sentences, tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        sc_c2s.tl.finetune(sentences, label_key="cell_type", base_model="scratch", output_dir=tmp_path)
    assert (tmp_path / "old.txt").read_text() == "keep me"
    (tmp_path / ".c2s_saving").touch()  # as a killed run's save leaves it
    with pytest.raises(FileExistsError, match="holds a checkpoint whose save stopped half-way"):
        sc_c2s.tl.finetune(sentences, label_key="cell_type", base_model="scratch", output_dir=tmp_path)


def test_output_dir_in_the_home_directory(sentences, tmp_path, monkeypatch):
    """`~` was taken literally: the checkpoint went to a folder `./~` and the returned path did not load."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    path = one_step(sentences, "~/model", eval_fraction=0)
    assert path == tmp_path / "home" / "model"
    assert load(path).metadata.tasks == ["cell_type_prediction"]
    assert not any((tmp_path / "cwd").iterdir())


@pytest.mark.parametrize("locked", ["file", "read-only"])
def test_output_dir_that_cannot_be_created_is_refused_before_training(sentences, tmp_path, monkeypatch, locked):
    """An output_dir below a file or an unwritable folder passed the up-front check and failed after training."""
    if locked == "file":
        (tmp_path / "results.h5ad").write_text("")
        output_dir, error, match = tmp_path / "results.h5ad" / "model", NotADirectoryError, "is a file"
    else:
        (tmp_path / "shared").mkdir()
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "shared" and access(p, mode))
        output_dir, error, match = tmp_path / "shared" / "a" / "model", PermissionError, "cannot write"
    with pytest.raises(error, match=rf"`output_dir` .*{match}.* pass"):
        one_step(sentences, output_dir)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["results.h5ad" if locked == "file" else "shared"]


def test_cells_without_sentences_are_refused_before_training(sentences, tmp_path):
    """Found by tests/test_hostile_inputs.py: cells whose sentences are all empty used to reach the training loop."""
    sentences.obsm["c2s_genes"][:] = -1
    sentences.obs["c2s_sentence"] = ""
    with pytest.raises(ValueError, match="No cell is left to train on"):
        sc_c2s.tl.finetune(sentences, label_key="cell_type", base_model="scratch", output_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.fixture
def donors() -> ad.AnnData:
    """30 cells of the mouse tissue fixture ranked on 10 genes, with integer donor ids."""
    adata = ad.read_h5ad(DATA / "tissue_mouse_300.h5ad")[::10].copy()
    sc_c2s.pp.to_sentences(adata, n_genes=10, rank_fit=False)
    adata.obs["donor"] = adata.obs["sample"].cat.codes.astype(int)
    return adata


def train_summaries(donors: ad.AnnData, texts: dict, output_dir: Path, **kwargs) -> Path:
    """One step of the summary task on the donors, grouped by donor."""
    return one_multi_cell_step(donors, output_dir, tasks=["summary"], summaries=texts, **kwargs)


def train_tissues(donors: ad.AnnData, output_dir: Path, **kwargs) -> Path:
    """One step of tissue prediction on the donors, grouped by donor."""
    return one_multi_cell_step(donors, output_dir, tasks=["tissue_prediction"], tissue_key="tissue", **kwargs)


def one_multi_cell_step(donors: ad.AnnData, output_dir: Path, **kwargs) -> Path:
    """One step of multi-cell tasks on the donors' 10-gene sentences, grouped by donor, 2 or 3 cells a sample."""
    options = {"base_model": "scratch", "groupby": "donor", "n_cells": (2, 3), **kwargs}
    return sc_c2s.tl.finetune(donors, output_dir=output_dir, n_genes=10, max_steps=1, **options)


def test_summaries_are_keyed_by_the_groups_values(donors, tmp_path):
    """A mapping keyed by the integer values of `groupby` was refused as holding no text: keys were `str(group)`."""
    texts = {d: f"cells of donor {d}" for d in donors.obs["donor"].unique()}
    assert load(train_summaries(donors, texts, tmp_path / "model")).metadata.tasks == ["summary"]
    for keys in (texts, {str(d): text for d, text in texts.items()}):  # the strings of the values, as before
        units = _samples.units(
            donors.obs, tasks=("summary",), tissue_key=None, groupby="donor", summaries=keys, n_cells=(2, 3)
        )
        assert units.summaries == [texts[int(d)] for d in sorted(map(str, texts))]  # units in sorted strings


def test_summaries_keyed_by_a_group_and_its_string(donors):
    """Keys ``1`` and ``"1"`` of one group: one text was dropped, and its key called no group."""
    texts = {d: f"cells of donor {d}" for d in donors.obs["donor"].unique()}
    first = next(iter(texts))
    options = {"tasks": ("summary",), "tissue_key": None, "groupby": "donor", "n_cells": (2, 3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same text twice is no conflict, and no key is left out
        units = _samples.units(donors.obs, summaries=texts | {str(first): texts[first]}, **options)
    assert set(units.summaries) == set(texts.values())
    with pytest.raises(
        ValueError, match=rf"two texts for the group {first} of obs\['donor'\], keyed {first} and '{first}'"
    ):
        _samples.units(donors.obs, summaries=texts | {str(first): "another text"}, **options)


def test_summaries_missing_for_some_groups(donors):
    """NaN for a group without a text, as `df.set_index(group)[column].to_dict()` gives it, was refused as if no
    group had a text; None worked."""
    donors_ = sorted(donors.obs["donor"].unique())
    options = {"tasks": ("summary",), "tissue_key": None, "groupby": "donor", "n_cells": (2, 3)}
    for missing in (np.nan, None):
        texts = {d: f"cells of donor {d}" if i % 2 else missing for i, d in enumerate(donors_)}
        units = _samples.units(donors.obs, summaries=texts, **options)
        expected = [texts[int(d)] if int(d) in donors_[1::2] else None for d in sorted(map(str, donors_))]
        assert units.summaries == expected
        with pytest.raises(ValueError, match="must hold a non-empty text for at least one group"):
            _samples.units(donors.obs, summaries=dict.fromkeys(donors_, missing), **options)


def test_summaries_that_are_no_group_are_named(donors, tmp_path):
    """Keys that match no group (a typo) were dropped without a word."""
    texts = {d: f"cells of donor {d}" for d in donors.obs["donor"].unique()} | {99: "no such donor"}
    with pytest.warns(UserWarning, match=r"1 keys of `summaries` are no group of obs\['donor'\] .*\[99\]") as record:
        train_summaries(donors, texts, tmp_path / "model")
    assert record[0].filename == __file__


def test_summaries_of_a_column_are_one_text_per_group(donors):
    """A group whose cells held different texts silently kept the first."""
    donors.obs["text"] = "cells of " + donors.obs["sample"].astype(str) + "."
    donors.obs.loc[donors.obs_names[1], "text"] = np.nan  # a cell without a text is passed over
    donors.obs.loc[donors.obs_names[2], "text"] = donors.obs["text"].iloc[2].replace(".", "  ")  # the same text
    kwargs = {"tasks": ("summary",), "tissue_key": None, "groupby": "sample", "n_cells": (2, 3)}
    units = _samples.units(donors.obs, summaries="text", **kwargs)
    assert units.summaries == [f"cells of {s}" for s in sorted(donors.obs["sample"].unique())]
    largest = donors.obs["sample"].value_counts().index[0]
    donors.obs.loc[donors.obs_names[donors.obs["sample"] == largest][-1], "text"] = "another text"
    with pytest.raises(ValueError, match=r"obs\['text'\] holds different texts for the cells of 1 groups"):
        _samples.units(donors.obs, summaries="text", **kwargs)


@pytest.mark.parametrize(("key", "what"), [("tissue", "tissue"), ("donor", "group")])
def test_cells_without_a_tissue_or_group_are_refused(donors, tmp_path, key, what):
    """They were left out of the multi-cell samples without a word, while `n_train_cells` counted them."""
    donors.obs[key] = donors.obs[key].astype(object)
    donors.obs.loc[donors.obs_names[[0, 5, 7]], key] = np.nan
    with pytest.raises(ValueError, match=rf"obs\['{key}'\] has 3 missing {what}s; drop those cells"):
        train_tissues(donors, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_base_model_must_know_the_tissues(donors, tmp_path):
    """Tissues a scratch checkpoint has no word for trained it to answer [UNK]; `predict_tissue` then refused the
    tissues of the model's own metadata."""
    base = train_tissues(donors, tmp_path / "base")
    donors.obs["tissue"] = donors.obs["tissue"].astype(str).replace({"kidney": "liver"})
    with pytest.raises(ValueError, match=r"has no words for the names \['liver'\] \(cell types, tissues or pert"):
        train_tissues(donors, tmp_path / "m", base_model=base)
    assert not (tmp_path / "m").exists()
    summaries = {0: "kidney"}  # tissues are no answer of the summary task
    train_summaries(donors, summaries, tmp_path / "m", base_model=base, tissue_key="tissue")


@pytest.mark.parametrize("tissue", ["", "kid\nney", "kid\rney", " kidney"])
def test_tissues_a_model_cannot_answer_are_refused(donors, tmp_path, tissue):
    """They trained silently: an empty answer, a multi-line one kept in `metadata.tissues`, and one with a space at
    an end, which a free answer (stripped) never matches."""
    donors.obs["tissue"] = donors.obs["tissue"].astype(str).replace({donors.obs["tissue"].iloc[0]: tissue})
    with pytest.raises(ValueError, match=r"obs\['tissue'\] has tissues that are empty, span several lines, or"):
        sc_c2s.tl.finetune(
            donors, base_model="scratch", output_dir=tmp_path / "m", tasks=["tissue_prediction"], tissue_key="tissue"
        )


def test_multi_cell_records_follow_the_tasks_trained(donors, tmp_path):
    """A summary model listed the tissues it never learnt (`predict_tissue` candidates) and `paraphrase` was
    recorded for tissue tasks; `n_cells` went unchecked without a multi-cell task, and above every group's size
    unannounced."""
    texts = {d: f"cells of donor {d}" for d in donors.obs["donor"].unique()}
    metadata = load(train_summaries(donors, texts, tmp_path / "summary", tissue_key="tissue")).metadata
    assert metadata.tissues is None and metadata.training["paraphrase"] is False
    largest = donors.obs.groupby(["tissue", "donor"], observed=True).size().max()
    with pytest.warns(UserWarning, match=rf"at least 50 cells, but the largest group .* has {largest}"):
        path = train_tissues(donors, tmp_path / "tissues", n_cells=(50, 60))
    assert "paraphrase" not in load(path).metadata.training
    with pytest.raises(ValueError, match=r"`n_cells` must be \(fewest, most\) cells per multi-cell sample"):
        sc_c2s.tl.finetune(
            donors, label_key="cell_type", base_model="scratch", output_dir=tmp_path / "m", n_cells=(0, -3)
        )


@pytest.mark.parametrize(
    ("eval_fraction", "expected"),
    [
        # the smallest line has 43 cells: 0.001 holds out none, 0.02 one of each (round(0.86))
        (
            0.001,
            "`eval_fraction=0.001` holds out no cell: training runs its whole budget without model selection (nor "
            "held-out scores); `eval_fraction=0.02` holds out at least one cell of each label with more than one",
        ),
        (
            0.03,
            "`eval_fraction=0.03` holds out 9 cells: fewer than 10 select the model on noise (and leave its scores "
            "uncalibrated); pass a larger `eval_fraction`, or 0 to train the whole budget without selection",
        ),
        (0.035, None),  # 10 cells, the fewest that fit a temperature
        (0.04, None),  # 12 cells
    ],
)
def test_too_few_held_out_cells_are_announced(sentences, tmp_path, scanpy_log, eval_fraction, expected):
    """An `eval_fraction` too small for the labels held out no cell (no selection) or one, without a word; and
    fewer than 10 cells fitted a temperature anyway, up to its bound of 100 where one of a few was wrong."""
    path = one_step(sentences, tmp_path / "m", eval_fraction=eval_fraction)
    metadata = load(path).metadata
    n_held_out = len(metadata.training["eval_obs_names"])
    assert list(metadata.score_temperatures) == (["0"] if n_held_out >= 10 else [])
    labels = sentences.obs["cell_type"].astype(str)
    assert n_held_out == split(labels, eval_fraction=eval_fraction).sum()  # the split is unchanged
    log = scanpy_log.getvalue()
    if expected is None:
        assert "eval_fraction" not in log
    else:
        assert log.count(expected) == 1
    if n_held_out == 0:  # the fraction suggested holds out a cell of every label
        assert (pd.Series(split(labels, eval_fraction=0.02)).groupby(labels.to_numpy()).sum() >= 1).all()


@pytest.mark.parametrize("best", [1.2, 36.41])
def test_the_fitted_temperature_is_the_likelihoods_optimum(best):
    """The first label is right for 3 cells of 4, `gap` nats ahead of the second: dividing by T gives it the
    probability 1 / (1 + 3 ** (-best / T)), which is 3/4, the likelihood's optimum, at T = best. Neither near the
    floor of 1 nor far above it is the optimum rounded to a bound."""
    loglik = np.array([[0.0, -best * np.log(3)]] * 4)
    assert fit_temperature(loglik, np.array([0, 0, 0, 1])) == pytest.approx(best, abs=1e-3)


def test_every_cell_right_fits_the_floor():
    assert fit_temperature(np.array([[0.0, -4.0], [-3.0, 0.0]]), np.array([0, 1])) == 1.0


class _TemperatureRun:
    """Stands in for generate and score_generation in `choose_temperature`: records what is asked, gives MMDs."""

    def __init__(self, monkeypatch, mmd=(0.3, 0.2, 0.1)):
        self.requests, self.seeds, self.mmd = [], [], list(mmd)
        monkeypatch.setattr(_generate, "generate", self.generate)
        monkeypatch.setattr(_score_generation, "score_generation", self.score)

    def generate(self, adata, **kwargs):
        self.requests.append(kwargs["cell_types"])
        return kwargs["temperature"]

    def score(self, real, generated, **kwargs):
        self.seeds.append(kwargs["random_state"])
        return pd.DataFrame({"mmd": [self.mmd.pop(0)]}, index=["overall"])

    def choose(self, labels, random_state=0):
        return choose_temperature(None, None, labels=labels, label_key="x", random_state=random_state, mod=None)


def test_the_temperature_is_chosen_on_cells_shared_as_the_types(monkeypatch):
    """B (3 cells) is too small to score and left out; A (4) gets the least a type is scored on, 4 (its share of
    200 is 3.1); C gets round(200 * 250 / 254) = 197. The lowest MMD wins."""
    run = _TemperatureRun(monkeypatch)
    chosen = run.choose(pd.Series(["C"] * 250 + ["B"] * 3 + ["A"] * 4))
    assert run.requests == [{"A": 4, "C": 197}] * 3
    assert [list(request) for request in run.requests] == [["A", "C"]] * 3
    assert chosen == (0.5, {"1.0": 0.3, "0.7": 0.2, "0.5": 0.1})


def test_the_temperature_stays_at_1_unless_another_does_better(monkeypatch):
    run = _TemperatureRun(monkeypatch, mmd=(0.2, 0.2, 0.2))
    assert run.choose(pd.Series(["A"] * 10 + ["B"] * 10))[0] == 1.0


def test_the_temperature_is_scored_with_the_seed_given(monkeypatch):
    run = _TemperatureRun(monkeypatch)
    run.choose(pd.Series(["A"] * 10 + ["B"] * 10), random_state=2**40 + 7)
    assert run.seeds == [7, 7, 7]  # score_generation takes seeds below 2**40


def test_no_temperature_is_chosen_without_a_type_of_4_cells(monkeypatch):
    run = _TemperatureRun(monkeypatch)
    assert run.choose(pd.Series(["A"] * 3 + ["B"] * 3)) is None
    assert run.requests == []


def test_the_held_out_cells_scored_after_training_are_at_most_about_max_scored_cells(sentences, tmp_path, monkeypatch):
    """All of them were annotated: a tenth of a million-cell atlas took about an hour on a CPU after a budget of
    minutes. Each label keeps its share, rounded down, and at least one cell."""
    labels = pd.Series(["A"] * 50 + ["B"] * 30 + ["C"] * 3)
    cells = np.arange(83)
    monkeypatch.setattr(_finetune, "MAX_SCORED_CELLS", 20)
    scored = _finetune._scored_cells(cells, labels, random_state=0)
    # shares 20 / 83 of 50, 30 and 3 cells: 12, 7 and 0, raised to 1
    assert labels.iloc[scored].value_counts().to_dict() == {"A": 12, "B": 7, "C": 1}
    assert np.array_equal(scored, np.sort(scored)) and len(set(scored)) == 20
    assert np.array_equal(scored, _finetune._scored_cells(cells, labels, random_state=0))
    assert np.array_equal(_finetune._scored_cells(cells[:20], labels, random_state=0), cells[:20])
    monkeypatch.setattr(_finetune, "MAX_SCORED_CELLS", 12)
    metadata = load(one_step(sentences, tmp_path / "m", eval_fraction=0.1)).metadata
    held_out = sentences.obs.loc[metadata.training["eval_obs_names"], "cell_type"].value_counts()
    assert held_out.sum() == 30
    assert metadata.scores["n_cells"] == sum(max(1, int(12 / 30 * n)) for n in held_out)


def test_duplicate_obs_names_are_announced(sentences, tmp_path, scanpy_log):
    """`training["eval_obs_names"]` then names more cells than were held out; it was not said, and the throwaway
    AnnData of the held-out cells raised anndata's own warning."""
    sentences.obs_names = [f"cell{i % 150}" for i in range(sentences.n_obs)]
    # without anndata's UserWarning, an error under this suite's filterwarnings
    path = one_step(sentences, tmp_path / "m")
    warning = (
        "150 obs_names are shared by several cells: training['eval_obs_names'] will also name the cells that share "
        "a held-out cell's name; make them unique first (`adata.obs_names_make_unique()`)"
    )
    assert scanpy_log.getvalue().count(warning) == 1
    metadata = load(path).metadata
    is_eval = split(sentences.obs["cell_type"].astype(str), eval_fraction=0.1)
    assert metadata.training["eval_obs_names"] == sentences.obs_names[is_eval].tolist()
    assert metadata.scores["n_cells"] == is_eval.sum() == 30


def test_learning_rate_warms_up_linearly_then_decays_to_a_tenth():
    # 5 warm-up steps of 105: 1/5, 2/5, … 1, then a cosine from 1 to 0.1 over the other 100 steps
    factors = [_trainer._lr_factor(step, 5, 105) for step in (0, 1, 4, 5, 55, 105, 200)]
    assert factors == pytest.approx([0.2, 0.4, 1.0, 1.0, 0.55, 0.1, 0.1])


def test_weight_decay_on_matrices_only(cell_samples):
    model = small_model(cell_samples[0])
    decay, no_decay = _trainer._parameter_groups(model, 0.01)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert decay["params"] and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["params"] and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_last_step_is_evaluated_off_the_interval(cell_samples, monkeypatch):
    monkeypatch.setattr(_trainer._Selection, "_scores", lambda self, choices: (np.zeros(60), choices.truth))
    result = train_small(
        small_model(cell_samples[0]), cell_samples, max_steps=7, held_out=cell_samples[2], eval_every=5
    )
    assert [point["step"] for point in result.curve] == [5, 7]


def test_default_interval_evaluates_twenty_times(cell_samples, monkeypatch):
    monkeypatch.setattr(_trainer._Selection, "_scores", lambda self, choices: (np.zeros(60), choices.truth))
    result = train_small(small_model(cell_samples[0]), cell_samples, max_steps=40, held_out=cell_samples[2])
    assert [point["step"] for point in result.curve] == list(range(2, 41, 2))


def test_batches_are_buckets_of_similar_length_in_random_order():
    lengths = np.arange(100)[::-1].copy()  # sample i has length 99 - i
    batches = _trainer.shuffled_batches(lengths, 10, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))  # each sample once
    # one chunk of 500 sorted by length: every batch holds ten consecutive lengths
    assert sorted(tuple(sorted(lengths[b])) for b in batches) == [tuple(range(i, i + 10)) for i in range(0, 100, 10)]
    # the batches come in a random order, not by length
    firsts = [int(lengths[b].min()) for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_cpu_dropout_drops_the_share_asked_for_and_keeps_the_mean():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.25))
    x = torch.ones(100_000, 4)
    with torch.random.fork_rng(), _dropout.cpu_dropout(model):
        torch.manual_seed(0)
        model.train()
        out = model[1](x)
    assert (out == 0).float().mean().item() == pytest.approx(0.25, abs=0.005)  # 4e5 draws: s.e. below 1e-3
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)


def test_gene_dropout_keeps_at_least_one_gene():
    for seed in range(20):  # at 0.999, most draws drop every gene: one is put back
        kept = _samples._drop(["A", "B", "C"], 0.999, np.random.default_rng(seed))
        assert len(kept) == 1 and kept[0] in {"A", "B", "C"}
