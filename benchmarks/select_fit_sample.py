"""How many cells the rank fit of ``pp.to_sentences`` needs: its sampling error against its cost, per dataset.

The rank → expression line is fitted on a seeded sample of cells (``rank_fit=True``: 2,000). A smaller sample costs
less (the fit reads every value of each sampled cell), but fits another line. For each shared dataset, on the
training cells of the benchmarks' splits (CellBench's plates CEL-seq2_5cl_p1 and p2; of the others, the training
80 %, stratified by label, seed 0; never their test cells), this script fits the line on every training cell (the
reference) and on 30 seeded samples of 250 to 2,000 cells, and prints:

- ``sd slope``, ``sd intercept``: the spread of the samples' lines;
- ``max |Δ| median``, ``max |Δ| worst``: per sample, the largest difference between its line and the reference over
  the first 200 positions of a sentence (what ``from_sentences`` and ``generate`` write), in ``log10(1 + x)``
  units; the median and the worst of the 30 samples. 0.1 is a 26 % error in expression;
- ``ms``: the median time of one fit of that many cells (2 threads here).

Last run (``python benchmarks/select_fit_sample.py``, 2 cores, load average about 2, so ``ms`` is more than an
idle machine takes; CellBench's training plates hold 604 cells, so its samples stop at 500)::

         dataset  cells sd slope sd intercept max |Δ| median max |Δ| worst   ms
       cellbench    250   0.0024       0.0135         0.0103        0.0389  7.0
       cellbench    500   0.0010       0.0065         0.0052        0.0183 14.2
          pbmc4k    250   0.0059       0.0149         0.0105        0.0347  1.3
          pbmc4k    500   0.0041       0.0093         0.0075        0.0274  1.9
          pbmc4k   1000   0.0021       0.0057         0.0044        0.0125  3.2
          pbmc4k   2000   0.0015       0.0041         0.0034        0.0100  5.3
    kang (log1p)    250   0.0058       0.0129         0.0100        0.0253  3.0
    kang (log1p)    500   0.0058       0.0121         0.0083        0.0244  4.4
    kang (log1p)   1000   0.0028       0.0060         0.0048        0.0151  6.6
          tissue    250   0.0230       0.0935         0.0340        0.2810  3.3
          tissue    500   0.0114       0.0434         0.0300        0.1025  5.5
          tissue   1000   0.0055       0.0200         0.0135        0.0465 11.1
          tissue   2000   0.0012       0.0043         0.0038        0.0103 23.6

(Samples as large as the training cells are left out: they are the reference. The spread shrinks faster than by
the square root of the sample size because the samples are drawn from a finite set of cells.)

On cells of one kind a few hundred cells would do, but on ``tissue`` (six mouse tissues from five studies, counts
and log-normalised values mixed) 500 cells fit lines up to 0.10 away (a quarter of the expression), and 2,000 keep
every sample within 0.011. Atlases, where a smaller default would save the most, are mixtures like that one, so
the default stays at 2,000 cells. The fit's time grows with the sample and the expressed genes per cell (about
5,900 in CellBench, 200 in pbmc4k), not with the number of cells in the data.

    python benchmarks/select_fit_sample.py [--data ../shared/data] [--draws 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from sc_c2s import _rank_model

ROOT = Path(__file__).resolve().parents[1]
#: Dataset, file, label and training batches (``None``: a stratified 80 %) of each benchmark split (as in
#: bench_annotation_accuracy.py: CellBench trains on two plates and tests on the other three batches).
DATASETS = {
    "cellbench": ("cellbench_5cl_counts.h5ad", "cell_type", ("CEL-seq2_5cl_p1", "CEL-seq2_5cl_p2")),
    "pbmc4k": ("pbmc4k_top2000_counts.h5ad", "cluster", None),
    "kang (log1p)": ("kang_scgen_valid.h5ad", "cell_type", None),
    "tissue": ("tissue_mouse_assembled_common.h5ad", "cell_type", None),
}
SIZES = (250, 500, 1000, 2000)
POSITIONS = np.arange(200)


def training_cells(adata: ad.AnnData, label: str, batches: tuple[str, ...] | None) -> ad.AnnData:
    """The benchmarks' training cells: those of `batches`, else 80 % stratified by `label` (labels of one cell go to
    training), seed 0."""
    if batches is not None:
        return adata[adata.obs["batch"].isin(batches)].copy()
    labels = adata.obs[label].astype(str)
    counts = labels.map(labels.value_counts())
    cells = np.arange(adata.n_obs)
    train, _ = train_test_split(cells[counts > 1], test_size=0.2, stratify=labels[counts > 1], random_state=0)
    return adata[np.sort(np.concatenate([train, cells[counts == 1]]))].copy()


def rows(name: str, adata: ad.AnnData, draws: int) -> list[dict]:
    """One row per sample size smaller than the data: the spread of `draws` fits and the time of one."""
    reference = _rank_model.fit(adata.X, n_cells=adata.n_obs)
    out = []
    for size in (s for s in SIZES if s < adata.n_obs):
        fits, seconds = [], []
        for seed in range(draws):
            start = time.perf_counter()
            fits.append(_rank_model.fit(adata.X, n_cells=size, random_state=seed))
            seconds.append(time.perf_counter() - start)
        worst = [np.abs(f.predict(POSITIONS) - reference.predict(POSITIONS)).max() for f in fits]
        out.append(
            {
                "dataset": name,
                "cells": size,
                "sd slope": np.std([f.slope for f in fits]),
                "sd intercept": np.std([f.intercept for f in fits]),
                "max |Δ| median": np.median(worst),
                "max |Δ| worst": np.max(worst),
                "ms": 1e3 * np.median(seconds[1:]),  # the first call compiles
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder with the shared .h5ad files"
    )
    parser.add_argument("--draws", type=int, default=30, help="seeded samples per size (default: %(default)s)")
    args = parser.parse_args()
    table = []
    for name, (file, label, batches) in DATASETS.items():
        table += rows(name, training_cells(ad.read_h5ad(args.data / file), label, batches), args.draws)
    formats = dict.fromkeys(("sd slope", "sd intercept", "max |Δ| median", "max |Δ| worst"), "{:.4f}".format)
    print(pd.DataFrame(table).to_string(index=False, formatters={**formats, "ms": "{:.1f}".format}))


if __name__ == "__main__":
    main()
