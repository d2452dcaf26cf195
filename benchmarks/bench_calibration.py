"""Calibration of constrained annotation's scores: how often a label given with probability p is right.

On the validation cells of ``select_defaults.py`` (carved from the training part of the benchmarks' datasets, never
their test splits), the model that script trained there with the package defaults annotates twice for each number
of labels re-ranked that ``finetune`` calibrates (0, the prediction alone, and the default 3): with the scores as
the model gives them, and divided by the temperatures ``finetune`` fits on its own held-out cells
(``metadata.score_temperatures``; for a model trained before they were recorded, fitted here as ``finetune``
fits them). Printed per dataset: accuracy, the mean score (the confidence) and the expected calibration error
(ECE: the cells in 10 equal-width bins of their score, the gap between each bin's accuracy and mean score, weighted
by its cells), before | after, and the temperature. The labels, hence the accuracy, are the same both times.

Train and keep the models first (``--models`` of both scripts is the same folder)::

    python benchmarks/select_defaults.py --knobs --datasets cellbench pbmc4k kang tissue --models DIR
    python benchmarks/bench_calibration.py --models DIR

Last run (the models of the method page's validation tables, seed 0, trained before the temperatures were
recorded; ``--threads 2`` on the otherwise idle 2-core machine)::

      dataset  rerank  cells accuracy    mean score           ECE temperature
    cellbench       0    307    0.935 0.989 | 0.963 0.054 | 0.032        2.49
    cellbench       3    307    0.954 0.994 | 0.971 0.045 | 0.030        3.01
       pbmc4k       0    684    0.861 0.976 | 0.864 0.117 | 0.041        2.79
       pbmc4k       3    684    0.876 0.976 | 0.889 0.101 | 0.034        3.11
         kang       0    316    0.823 0.963 | 0.848 0.141 | 0.042        2.49
         kang       3    316    0.832 0.963 | 0.845 0.135 | 0.038        2.88
       tissue       0    438    0.751 0.883 | 0.746 0.133 | 0.038        1.87
       tissue       3    438    0.742 0.916 | 0.783 0.174 | 0.051        1.94

Every model was overconfident, by 4.5 to 17.4 points of ECE, with or without re-ranking. The temperatures, fitted on
29 to 274 held-out training cells (CellBench the fewest), cut the ECE of the validation cells to 3.0 to 5.1 points;
the mean score came within 3 points of the accuracy everywhere but the tissues re-ranked (4.1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from select_defaults import DATA, DATASETS, model_name

import sc_c2s
from sc_c2s._data import DataHandler
from sc_c2s.tl._finetune import _evaluate

#: Bins of the score for the expected calibration error.
N_BINS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the shared .h5ad files")
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS), help="datasets to run (default: all)"
    )
    parser.add_argument("--models", type=Path, required=True, help="the --models folder of select_defaults.py")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the models (select_defaults --base)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    args = parser.parse_args()
    sc.settings.verbosity = 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = {} if args.seed == 0 else {"random_state": args.seed}
    rows = []
    for name in args.datasets:
        train, valid, label_key = DATASETS[name](args.data)
        gene_symbols = "gene_symbol" if "gene_symbol" in train.var else None
        for adata in (train, valid):
            sc_c2s.pp.to_sentences(adata, gene_symbols=gene_symbols)
        model = sc_c2s.models.load(args.models / model_name(name, base))
        temperatures = model.metadata.score_temperatures or fitted_temperatures(model, train, label_key)
        for rerank in sorted(map(int, temperatures)):
            scores = {}
            for calibrated in (False, True):
                model.metadata.score_temperatures = temperatures if calibrated else {}
                out = sc_c2s.tl.annotate(valid, model=model, labels="model", rerank=rerank, copy=True)
                right = (out.obs["c2s_cell_type"].astype(str) == valid.obs[label_key].astype(str)).to_numpy()
                scores[calibrated] = (right, out.obs["c2s_cell_type_score"].to_numpy())
            right = scores[False][0]
            rows.append(
                {
                    "dataset": name,
                    "rerank": rerank,
                    "cells": valid.n_obs,
                    "accuracy": f"{right.mean():.3f}",
                    "mean score": " | ".join(f"{scores[c][1].mean():.3f}" for c in (False, True)),
                    "ECE": " | ".join(f"{ece(*scores[c]):.3f}" for c in (False, True)),
                    "temperature": f"{temperatures[str(rerank)]:.2f}",
                }
            )
            print(pd.DataFrame([rows[-1]]).to_string(header=len(rows) == 1, index=False), flush=True)
    print(f"\n{pd.DataFrame(rows).to_string(index=False)}")


def fitted_temperatures(model: sc_c2s.models.C2SModel, train: ad.AnnData, label_key: str) -> dict[str, float]:
    """The temperatures `finetune` records, fitted on the model's held-out cells of `train` as it fits them."""
    cells = train.obs_names.get_indexer(model.metadata.training["eval_obs_names"])
    handler = DataHandler(train)
    _, temperatures = _evaluate(
        model, handler, train.uns["c2s"], cells, train.obs[label_key], n_genes=model.metadata.n_genes
    )
    return temperatures


def ece(right: np.ndarray, score: np.ndarray) -> float:
    """Expected calibration error of `score` as the probability of `right`, over :data:`N_BINS` equal bins."""
    bins = np.minimum((score * N_BINS).astype(int), N_BINS - 1)
    return sum((bins == b).mean() * abs(right[bins == b].mean() - score[bins == b].mean()) for b in np.unique(bins))


if __name__ == "__main__":
    main()
