"""Derive the small committed test fixtures in ``tests/data`` from the shared real datasets.

Run from the repository root: ``python scripts/make_test_fixtures.py [--source ../shared/data]``.
The sampling is seeded, so the output is reproducible; ``tests/data/README.md`` lists the checksums.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from anndata.utils import make_index_unique
from scipy import sparse

SEED = 0
OUT = Path(__file__).resolve().parents[1] / "tests" / "data"


def stratified_sample(labels: pd.Series, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``n`` cells drawn without replacement, allocated to each stratum in proportion (at least 1, so
    more than ``n`` where there are more strata)."""
    codes, uniques = pd.factorize(labels, sort=True)
    counts = np.bincount(codes, minlength=len(uniques))
    quota = np.maximum(1, np.floor(counts / counts.sum() * n)).astype(int)
    # hand the remainder to the largest strata, one cell each
    for i in np.argsort(-counts, kind="stable")[: max(0, n - quota.sum())]:
        quota[i] += 1
    picks = [
        rng.choice(np.flatnonzero(codes == i), size=min(q, c), replace=False)
        for i, (q, c) in enumerate(zip(quota, counts, strict=True))
    ]
    return np.sort(np.concatenate(picks))


def top_genes(x: sparse.csr_matrix, n: int) -> np.ndarray:
    """Positions of the ``n`` genes with the largest total counts, in their original order."""
    totals = np.asarray(x.sum(axis=0)).ravel()
    return np.sort(np.argsort(-totals, kind="stable")[:n])


def finish(adata: ad.AnnData) -> ad.AnnData:
    x = sparse.csr_matrix(adata.X, dtype=np.float32)
    x.sort_indices()
    x.eliminate_zeros()
    adata.X = x
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = adata.var_names.astype(str)
    return adata


def cellbench(source: Path, rng: np.random.Generator) -> ad.AnnData:
    full = ad.read_h5ad(source / "cellbench_5cl_counts.h5ad")
    strata = full.obs["cell_type"].astype(str) + "|" + full.obs["batch"].astype(str)
    cells = stratified_sample(strata, 300, rng)
    genes = top_genes(full.X, 2000)
    sub = full[cells, genes].copy()
    symbols = sub.var["gene_symbol"].astype(object).where(sub.var["gene_symbol"].notna(), sub.var_names.to_series())
    sub = ad.AnnData(
        X=sub.X,
        obs=sub.obs[["cell_type", "batch"]].astype("category"),
        var=pd.DataFrame({"gene_symbol": make_index_unique(pd.Index(symbols.astype(str)))}, index=sub.var_names),
    )
    return finish(sub)


def pbmc4k(source: Path, rng: np.random.Generator) -> ad.AnnData:
    full = ad.read_h5ad(source / "pbmc4k_top2000_counts.h5ad")
    cells = stratified_sample(full.obs["cluster"].astype(str), 500, rng)
    sub = full[cells].copy()
    sub = ad.AnnData(X=sub.X, obs=sub.obs[["cluster"]].astype("category"), var=pd.DataFrame(index=sub.var_names))
    return finish(sub)


def tissue_samples(tissue: pd.Series, size: int, rng: np.random.Generator) -> pd.Categorical:
    """Split each tissue's cells into seeded samples of `size` cells (the last may be smaller): ``"lung_1"`` …

    The source has no donor or sample column (each tissue is one study), so samples are drawn at random within
    a tissue.
    """
    names = np.empty(len(tissue), dtype=object)
    for name in sorted(tissue.unique()):
        cells = rng.permutation(np.flatnonzero(tissue.to_numpy() == name))
        names[cells] = [f"{name}_{i // size + 1}" for i in range(len(cells))]
    return pd.Categorical(names)


def tissue_mouse(source: Path, rng: np.random.Generator) -> ad.AnnData:
    full = ad.read_h5ad(source / "tissue_mouse_assembled_common.h5ad")
    tissue = full.obs["tissue"].astype(str)
    cells = np.sort(
        np.concatenate(
            [
                np.flatnonzero(tissue == name)[
                    stratified_sample(full.obs["cell_type"][tissue == name].astype(str), 50, rng)
                ]
                for name in sorted(tissue.unique())
            ]
        )
    )
    sub = full[cells].copy()
    detected = np.asarray((sub.X > 0).sum(axis=0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:2000])
    sub = sub[:, genes].copy()
    obs = sub.obs[["tissue", "cell_type", "value_type"]].astype(str)
    obs["sample"] = tissue_samples(obs["tissue"], 10, rng)
    sub = ad.AnnData(X=sub.X, obs=obs.astype("category"), var=pd.DataFrame(index=sub.var_names))
    return finish(sub)


#: Cell types of the Kang fixture, and the interferon-response genes it keeps whatever their totals.
KANG_TYPES = ("B", "CD4T", "CD14+Mono")
KANG_GENES = ("ISG15", "IFI6", "IFIT1")


def kang(source: Path, rng: np.random.Generator) -> ad.AnnData:
    full = ad.read_h5ad(source / "kang_scgen_valid.h5ad")
    full = full[full.obs["cell_type"].isin(KANG_TYPES)]
    strata = full.obs["cell_type"].astype(str) + "|" + full.obs["condition"].astype(str)
    cells = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(strata == s), size=min(67, (strata == s).sum()), replace=False)
                for s in sorted(set(strata))
            ]
        )
    )
    counts = full.layers["counts_reconstructed"]
    genes = np.union1d(top_genes(counts, 1000), full.var_names.get_indexer(KANG_GENES))
    sub = ad.AnnData(
        X=counts[cells][:, genes],
        obs=full.obs.iloc[cells][["cell_type", "condition"]].astype(str).astype("category"),
        var=pd.DataFrame(index=full.var_names[genes]),
    )
    return finish(sub)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--source",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data",
        help="folder with the shared .h5ad files",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    fixtures = [
        ("cellbench_300.h5ad", cellbench),
        ("pbmc4k_500.h5ad", pbmc4k),
        ("tissue_mouse_300.h5ad", tissue_mouse),
        ("kang_400.h5ad", kang),
    ]
    for name, make in fixtures:
        adata = make(args.source, np.random.default_rng(SEED))
        path = OUT / name
        adata.write_h5ad(path, compression="gzip")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{digest}  {name}  {adata.n_obs} x {adata.n_vars}, {adata.X.nnz} nonzeros, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
