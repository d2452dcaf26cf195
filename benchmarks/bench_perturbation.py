"""Perturbation response with ``sc_c2s.tl.predict_perturbation``: the classic held-out cell type.

For each held-out cell type, a model is trained from scratch with ``tl.finetune(tasks=["perturbation"])`` and the
package defaults on all control cells and on the stimulated cells of every other type (pairs within a cell type);
it then predicts the held-out type's stimulated state from that type's control cells.
``tl.score_perturbation`` scores the predicted cells against the real stimulated cells of the type, beside the
*control unchanged* and *mean shift* baselines of the same call (R² of mean expression over all genes and the
top-100 DE genes, direction of the top-20 DE genes, MMD). A second table shows whether the interferon-response
genes ISG15, IFI6 and IFIT1 go up: their mean in the real control, real stimulated and predicted cells.

Targets (issue 14): predicted cells beat *control unchanged* on every figure and match or beat *mean shift* on
the top-100 R²; ISG15, IFI6, IFIT1 go up; training ≤ 15 minutes on 2 cores.

Data: ``kang_scgen_valid.h5ad`` (Kang et al. 2018, PBMCs, control vs IFN-β; the validation split of scGen,
github.com/theislab/scgen ``data/valid.h5ad`` at f8541a6e), ranked on ``layers["counts_reconstructed"]``.

    python benchmarks/bench_perturbation.py --data ../shared/data/kang_scgen_valid.h5ad

``--epochs`` and ``--n-genes`` trade quality for time where the defaults (at most 2,400 steps of 16 samples, 200-gene
sentences) do not fit the time at hand; they are printed with the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import pandas as pd

import sc_c2s
from sc_c2s.tl import _score_perturbation

CONDITION, CONTROL, STIMULATED, CELL_TYPE = "condition", "control", "stimulated", "cell_type"
HELD_OUT = ["CD14+Mono", "CD4T", "B"]
IFN_GENES = ["ISG15", "IFI6", "IFIT1"]
FIGURES = ["r2_all", "r2_top100", "direction_top20", "mmd"]


def run(
    adata: ad.AnnData, held_out: str, workdir: Path, *, epochs: int | None, n_genes: int
) -> tuple[pd.Series, pd.DataFrame, dict[str, float]]:
    is_held_out = adata.obs[CELL_TYPE] == held_out
    train = adata[~(is_held_out & (adata.obs[CONDITION] == STIMULATED))].copy()
    start = time.perf_counter()
    path = sc_c2s.tl.finetune(
        train,
        base_model="scratch",
        output_dir=workdir / held_out.replace("+", "_"),
        tasks=["perturbation"],
        condition_key=CONDITION,
        control=CONTROL,
        pair_by=CELL_TYPE,
        n_genes=n_genes,
        epochs=epochs,
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = sc_c2s.tl.predict_perturbation(
        adata[is_held_out].copy(),
        model=path,
        perturbations=[STIMULATED],
        condition_key=CONDITION,
        control=CONTROL,
        groupby=CELL_TYPE,
        n_genes=n_genes,
    )
    predict_seconds = time.perf_counter() - start
    scores = sc_c2s.tl.score_perturbation(
        adata, predicted, condition_key=CONDITION, control=CONTROL, groupby=CELL_TYPE
    ).iloc[0]
    data = _score_perturbation.cells(adata, predicted, condition_key=CONDITION, control=CONTROL, groupby=CELL_TYPE)
    means = _score_perturbation.contrast(data, group=held_out, perturbation=STIMULATED, control=CONTROL).means
    timing = {"train_s": train_seconds, "predict_s": predict_seconds, "cells_per_s": predicted.n_obs / predict_seconds}
    return scores, means.loc[IFN_GENES, ["unchanged", "real", "predicted", "mean_shift"]], timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data" / "kang_scgen_valid.h5ad")
    parser.add_argument("--held-out", nargs="+", default=HELD_OUT)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the package's)")
    parser.add_argument("--n-genes", type=int, default=200, help="genes per sentence (default: the package's)")
    args = parser.parse_args()
    adata = ad.read_h5ad(args.data)
    sc_c2s.pp.to_sentences(adata, layer="counts_reconstructed")
    print(f"epochs: {args.epochs or 'default'}, n_genes: {args.n_genes}", flush=True)
    table, genes, timings = {}, {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for cell_type in args.held_out:
            scores, means, timing = run(adata, cell_type, Path(workdir), epochs=args.epochs, n_genes=args.n_genes)
            table[cell_type], genes[cell_type], timings[cell_type] = scores, means, timing
            print(f"held out {cell_type}: trained in {timing['train_s']:.0f} s", flush=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        scores = pd.DataFrame(table).T
        for figure in FIGURES:
            print(f"\n{figure} (predicted | control unchanged | mean shift; MMD: lower is better)")
            print(scores[[figure, f"{figure}_unchanged", f"{figure}_mean_shift"]].to_string())
        print("\nbeats unchanged on every figure, matches or beats mean shift on r2_top100:")
        better = (
            scores[[f + "" for f in FIGURES[:3]]].to_numpy()
            > scores[[f + "_unchanged" for f in FIGURES[:3]]].to_numpy()
        ).all(1)
        better &= scores["mmd"] < scores["mmd_unchanged"]
        print(
            pd.DataFrame(
                {
                    "beats_unchanged": better,
                    "top100_vs_mean_shift": scores["r2_top100"] >= scores["r2_top100_mean_shift"],
                }
            ).to_string()
        )
        print("\nIFN-response genes, mean expression (log10 scale of the rank fit):")
        print(
            pd.concat(genes, names=["held_out", "gene"])
            .assign(up=lambda d: d["predicted"] > d["unchanged"])
            .to_string()
        )
        print("\ntiming:")
        print(pd.DataFrame(timings).T.to_string())


if __name__ == "__main__":
    main()
