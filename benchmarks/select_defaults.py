"""Choose ``tl.finetune``'s and ``tl.generate``'s defaults on validation cells carved from the training data.

Each knob is varied on its own around the package defaults (one at a time, not a full grid), a model is trained
from scratch with ``tl.finetune`` (its own held-out 10 % selects the weights) and scored on validation cells that
no training run sees. The test splits of ``bench_annotation_accuracy.py`` and ``bench_generation.py`` are never
read: the validation cells come from their training part.

- ``pbmc4k_top2000_counts.h5ad``, label ``cluster``: the benchmark's training 80 % (stratified, seed 0), of
  which a stratified 20 % (seed 1) validates.
- ``cellbench_5cl_counts.h5ad``, label ``cell_type``: the benchmark trains on plates CEL-seq2_5cl_p1 and p2 and
  tests on the other three batches; here p1 trains and p2 validates, so the validation crosses a plate as the
  test does.
- ``kang_scgen_valid.h5ad``, label ``cell_type`` (7 PBMC types, control and stimulated cells mixed), counts from
  ``layers["counts_reconstructed"]``: as pbmc4k.
- ``tissue_mouse_assembled_common.h5ad``, label ``cell_type`` (40 source annotations, many of about ten cells): as
  pbmc4k, the benchmark's training 80 %, of which a stratified 20 % validates.

Scores: accuracy and macro-F1 of constrained annotation of the validation cells; when the model learnt
generation, 50 generated cells per label against the validation cells (``tl.score_generation``: kNN label
recovery, MMD over its real-vs-real control, share of valid words) at the temperature ``finetune`` chose for the
model (column ``temperature``); training seconds, steps and why training stopped. Sampling knobs (temperature,
top-p) reuse the model trained with the package defaults: its rows at temperatures 1.0, 0.7 and 0.5 show whether
``finetune``'s choice, made on the training cells, is the best one on the validation cells. The same model also
annotates with other numbers of labels re-ranked by the generation task (``rerank`` of ``tl.annotate``; its
``annotate s`` column is the time of annotation). ``--models DIR`` keeps the model trained with the defaults in
``DIR/<dataset>`` (``_s<seed>`` and ``--base`` settings appended) and reuses it when a later run finds it there.

``--curve STEPS`` trains once with the defaults for STEPS steps without early stopping, keeps the weights of every
evaluation, and scores each of them as above, beside what ``finetune`` recorded at that step (held-out answer loss
and label accuracy of each task): it shows how the scores grow with training and which held-out figure follows
them.

Knobs (``--quick`` takes the first values of each list after the default; the full sweep all of them):
learning rate, batch size, gene dropout, label balance, width × depth of the scratch model, tasks, the step budget,
genes per training sentence (the model's ``n_genes``, which annotation and generation then use), the sampling
temperature and top-p of ``tl.generate``, and the labels ``tl.annotate`` re-ranks. Not swept: the schedule
(warm-up, cosine decay), weight decay, dropout inside the model, the evaluation interval and patience, and any
pretrained or LoRA setting.

    python benchmarks/select_defaults.py --quick --datasets cellbench --threads 2   # ~1.5 h on 2 cores
    python benchmarks/select_defaults.py --curve 2400 --datasets cellbench --threads 1   # ~40 min on a busy core
    python benchmarks/select_defaults.py                                              # the full sweep, hours
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from anndata.utils import make_index_unique
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

import sc_c2s
from sc_c2s.models import _scratch, _trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: Seed of training (unless `--base random_state=...`) and of generation.
SEED = 0
#: Values tried for each knob, most promising first (``--quick`` tries the first one or two).
KNOBS = {
    "learning_rate": [4e-3, 1e-3, 5e-4],
    "batch_size": [32, 8, 64],
    "gene_dropout": [0.3, 0.5, 0.1],
    "balance_labels": [0.5, 1.0],
    "size": [(256, 2), (64, 2), (128, 4)],
    "tasks": [("cell_type_prediction",), ("cell_type_generation",)],
    "max_steps": [1200, 3600],
    "n_genes": [400, 100],
}
SAMPLING = {"temperature": [1.0, 0.7, 0.5, 0.85], "top_p": [1.0, 0.9]}
#: Labels re-ranked by the generation task in constrained annotation (the default model; 3 by default).
RERANK = [0, 2, 5, 10]
QUICK = {
    "learning_rate": 1,
    "batch_size": 1,
    "gene_dropout": 1,
    "balance_labels": 1,
    "size": 1,
    "tasks": 2,
    "max_steps": 1,
    "n_genes": 2,
    "temperature": 3,
    "top_p": 1,
    "rerank": 2,
}
N_GENERATED = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the shared .h5ad files")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["cellbench", "pbmc4k"],
        choices=list(DATASETS),
        help="validation splits to run (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="one or two values per knob (see QUICK)")
    knobs = [*KNOBS, *SAMPLING, "rerank"]
    parser.add_argument("--knobs", nargs="*", default=knobs, choices=knobs, help="knobs to vary")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run with the defaults (and sampling)")
    parser.add_argument(
        "--base",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="finetune arguments of every run, e.g. max_steps=1000 or random_state=1 (another training seed)",
    )
    parser.add_argument("--max-time", type=float, help="finetune's max_time of every run, seconds")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    parser.add_argument("--curve", type=int, metavar="STEPS", help="score the weights of every evaluation instead")
    parser.add_argument(
        "--models",
        type=Path,
        help="keep the model trained with the defaults in this folder, and reuse it where an earlier run kept it",
    )
    args = parser.parse_args()
    sc.settings.verbosity = 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"sc_c2s {sc_c2s.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.datasets:
        train, valid, label_key = DATASETS[name](args.data)
        print(f"\n{name}: {train.n_obs} training cells, {valid.n_obs} validation cells", flush=True)
        gene_symbols = "gene_symbol" if "gene_symbol" in train.var else None
        for adata in (train, valid):
            sc_c2s.pp.to_sentences(adata, gene_symbols=gene_symbols)
        base = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in args.base)}
        if args.curve is not None:
            for row in curve(name, train, valid, label_key, base, steps=args.curve):
                rows.append(
                    {"dataset": name, "base": " ".join(args.base), "knob": "step", "value": row.pop("step"), **row}
                )
                print(pd.DataFrame([rows[-1]]).to_string(header=len(rows) == 1, index=False), flush=True)
            continue
        runs = [] if args.no_baseline else [("defaults", None, {})]
        for knob in [knob for knob in args.knobs if knob in KNOBS]:
            runs += [(knob, v, {knob: v}) for v in (KNOBS[knob][: QUICK[knob]] if args.quick else KNOBS[knob])]
        for knob, value, change in runs:
            # a time-limited run is not the defaults' model, which later runs (and bench_calibration) read
            keep = None if args.models is None or change or args.max_time else args.models / model_name(name, base)
            row, model = run(name, train, valid, label_key, base | change, max_time=args.max_time, keep=keep)
            rows.append({"dataset": name, "base": " ".join(args.base), "knob": knob, "value": value, **row})
            print(pd.DataFrame([rows[-1]]).to_string(header=len(rows) == 1, index=False), flush=True)
            if knob == "defaults" and "cell_type_generation" in model.metadata.tasks:
                for sampling, values in SAMPLING.items():
                    if sampling not in args.knobs:
                        continue
                    for v in values[: QUICK[sampling]] if args.quick else values:
                        scores = generation(model, train, valid, label_key, {sampling: v})
                        rows.append(
                            {"dataset": name, "base": " ".join(args.base), "knob": sampling, "value": v, **scores}
                        )
                        print(pd.DataFrame([rows[-1]]).to_string(header=False, index=False), flush=True)
            both = {"cell_type_prediction", "cell_type_generation"} <= set(model.metadata.tasks)
            if knob == "defaults" and both and "rerank" in args.knobs:
                for v in RERANK[: QUICK["rerank"]] if args.quick else RERANK:
                    scores = annotation(model, valid, label_key, rerank=v)
                    rows.append({"dataset": name, "base": " ".join(args.base), "knob": "rerank", "value": v, **scores})
                    print(pd.DataFrame([rows[-1]]).to_string(header=False, index=False), flush=True)
    table = pd.DataFrame(rows).set_index(["dataset", "base", "knob", "value"])
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(f"\n{table.to_string(float_format=lambda x: f'{x:.3f}')}")
    print(f"\nload average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def pbmc4k(data: Path) -> tuple[ad.AnnData, ad.AnnData, str]:
    """The benchmark's training 80 % (seed 0), split again 80/20 (seed 1) into training and validation."""
    return _carve(ad.read_h5ad(data / "pbmc4k_top2000_counts.h5ad"), "cluster")


def tissue(data: Path) -> tuple[ad.AnnData, ad.AnnData, str]:
    """The mouse tissues' cell types (40, many of about ten cells): the benchmark's training 80 %, split 80/20."""
    return _carve(ad.read_h5ad(data / "tissue_mouse_assembled_common.h5ad"), "cell_type")


def kang(data: Path) -> tuple[ad.AnnData, ad.AnnData, str]:
    """Kang's 7 PBMC types (control and IFN-β-stimulated cells mixed), from its counts layer, as the benchmark reads
    them: the benchmark's training 80 %, split 80/20."""
    adata = ad.read_h5ad(data / "kang_scgen_valid.h5ad")
    adata.X = adata.layers["counts_reconstructed"]
    return _carve(adata, "cell_type")


def _carve(adata: ad.AnnData, label_key: str) -> tuple[ad.AnnData, ad.AnnData, str]:
    """The benchmark's training 80 % (stratified, seed 0), split again 80/20 (seed 1) into training and validation."""
    labels = adata.obs[label_key]
    train, _ = train_test_split(np.arange(adata.n_obs), test_size=0.2, stratify=labels, random_state=0)
    adata = adata[np.sort(train)].copy()
    train, valid = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=adata.obs[label_key], random_state=1
    )
    return adata[np.sort(train)].copy(), adata[np.sort(valid)].copy(), label_key


def cellbench(data: Path) -> tuple[ad.AnnData, ad.AnnData, str]:
    """Plate CEL-seq2_5cl_p1 to train, p2 to validate (the benchmark's test batches are not read)."""
    adata = ad.read_h5ad(data / "cellbench_5cl_counts.h5ad")
    adata.var["gene_symbol"] = make_index_unique(adata.var["gene_symbol"].astype(str))
    batch = adata.obs["batch"]
    return adata[batch == "CEL-seq2_5cl_p1"].copy(), adata[batch == "CEL-seq2_5cl_p2"].copy(), "cell_type"


DATASETS = {"cellbench": cellbench, "pbmc4k": pbmc4k, "kang": kang, "tissue": tissue}
#: File beside a kept model with the seconds of the `finetune` call that trained it ("train s" of a fresh run).
SECONDS_FILE = "finetune_seconds.txt"


def model_name(name: str, base: dict) -> str:
    """Folder name of the model trained on dataset `name` with the defaults and `base` (its seed, if not SEED)."""
    seed = base.get("random_state", SEED)
    rest = {k: v for k, v in base.items() if k != "random_state"}
    return "_".join([name, *([f"s{seed}"] if seed != SEED else []), *(f"{k}={v}" for k, v in sorted(rest.items()))])


def run(
    name: str,
    train: ad.AnnData,
    valid: ad.AnnData,
    label_key: str,
    change: dict,
    *,
    max_time: float | None,
    keep: Path | None = None,
) -> tuple[dict, sc_c2s.models.C2SModel]:
    """Train with the defaults but for `change`; score annotation (and generation) of the validation cells.

    `keep`: where the model is kept, and read from instead of training where an earlier run kept it, with the
    seconds its `finetune` call took (:data:`SECONDS_FILE`).
    """
    if keep is not None and keep.is_dir():
        model = sc_c2s.models.load(keep)
        return model_scores(model, float((keep / SECONDS_FILE).read_text()), train, valid, label_key), model
    change = dict(change)
    size = change.pop("size", None)
    scratch_size = _scratch.scratch_size
    if size is not None:
        hidden, layers = size
        scratch_size = lambda n_cells: {"hidden_size": hidden, "n_layers": layers, "n_heads": 4}  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(_scratch, "scratch_size", scratch_size):
        start = time.perf_counter()
        path = sc_c2s.tl.finetune(
            train,
            label_key=label_key,
            base_model="scratch",
            output_dir=Path(tmp) / name,
            max_time=max_time,
            **({"random_state": SEED} | change),
        )
        seconds = time.perf_counter() - start
        if keep is not None:
            shutil.copytree(path, keep)
            (keep / SECONDS_FILE).write_text(f"{seconds:.1f}")
        model = sc_c2s.models.load(path)
    return model_scores(model, seconds, train, valid, label_key), model


def model_scores(model, seconds: float, train: ad.AnnData, valid: ad.AnnData, label_key: str) -> dict:
    """Training figures of `model`, and its annotation (and generation) of the validation cells."""
    training = model.metadata.training
    row = {
        "train s": seconds,
        "steps": training["steps"],
        "best step": training["best_step"],
        "stopped": training["stopped"],
        "temperature": model.metadata.temperature,
    }
    if "cell_type_prediction" in model.metadata.tasks:
        row |= annotation(model, valid, label_key)
    if "cell_type_generation" in model.metadata.tasks:
        row |= generation(model, train, valid, label_key, {})
    return row


def curve(name: str, train: ad.AnnData, valid: ad.AnnData, label_key: str, base: dict, *, steps: int) -> list[dict]:
    """Train `steps` steps without early stopping; score the weights of every evaluation on the validation cells."""
    snapshots = {}
    evaluate = _trainer._Selection.evaluate

    def keep(selection, step, start):
        evaluate(selection, step, start)
        snapshots[step] = {k: p.detach().clone() for k, p in selection.model.named_parameters()}

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(_trainer._Selection, "evaluate", keep):
        path = sc_c2s.tl.finetune(
            train,
            label_key=label_key,
            base_model="scratch",
            output_dir=Path(tmp) / name,
            **({"random_state": SEED, "max_steps": steps, "patience": None, "eval_every": max(1, steps // 10)} | base),
        )
        model = sc_c2s.models.load(path)
    recorded = {point["step"]: point for point in model.metadata.training["curve"]}
    parameters = dict(model.model.named_parameters())
    rows = []
    for step, weights in snapshots.items():
        with torch.no_grad():
            for k, p in weights.items():
                parameters[k].copy_(p)
        row = {"step": step}
        for task in model.metadata.tasks:
            short = task.removeprefix("cell_type_")
            row |= {
                f"{short} loss": recorded[step]["loss"][task],
                f"{short} label acc.": recorded[step]["accuracy"][task],
            }
        row |= annotation(model, valid, label_key)
        rows.append(row | generation(model, train, valid, label_key, {}))
    return rows


def annotation(model, valid: ad.AnnData, label_key: str, **options) -> dict:
    """Accuracy, macro-F1 and seconds of constrained annotation of the validation cells."""
    cells = valid.copy()
    start = time.perf_counter()
    sc_c2s.tl.annotate(cells, model=model, labels="model", **options)
    seconds = time.perf_counter() - start
    truth, predicted = cells.obs[label_key].astype(str), cells.obs["c2s_cell_type"].astype(str)
    return {
        "accuracy": accuracy_score(truth, predicted),
        "macro-F1": f1_score(truth, predicted, average="macro"),
        "annotate s": seconds,
    }


def generation(model, train: ad.AnnData, valid: ad.AnnData, label_key: str, sampling: dict) -> dict:
    """kNN recovery, MMD / control and valid words of generated cells against the validation cells."""
    if model is None or "cell_type_generation" not in model.metadata.tasks:
        return {}
    cell_types = dict.fromkeys(sorted(train.obs[label_key].astype(str).unique()), N_GENERATED)
    generated = sc_c2s.tl.generate(train, model=model, cell_types=cell_types, random_state=SEED, **sampling)
    overall = sc_c2s.tl.score_generation(valid, generated, label_key=label_key).loc["overall"]
    counts = generated.obs[["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]].to_numpy().sum(axis=0)
    return {
        "knn": overall["knn_recovery"],
        "mmd / control": overall["mmd"] / overall["mmd_control"],
        "valid": counts[0] / counts.sum(),
    }


if __name__ == "__main__":
    main()
