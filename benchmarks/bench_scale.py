"""Atlas scale: out-of-core `to_sentences` on a lazy (dask) matrix, and `annotate` in one process vs a Dask cluster.

Run from the repository root (needs `sc-c2s[dask]`)::

    python benchmarks/bench_scale.py                       # 1,000,000 cells × 20,000 genes (~8 GB on disk)
    python benchmarks/bench_scale.py --n-cells 100000 --annotate-cells 2000

1. Writes a synthetic h5ad of `--n-cells` cells × `--n-genes` genes with about `--expressed` expressed genes per cell
   (counts 1 + Poisson, means falling off as a power of the gene's rank in the cell, so mostly small counts with
   ties and a few large ones), chunk by chunk: the matrix is never in memory.
2. Ranks it out of core: `anndata.experimental.read_lazy` (needs `xarray`) gives a dask array of CSR row chunks,
   `sc_c2s.pp.to_sentences(adata, n_genes=200)` makes the lazy `obsm["c2s_genes"]` (and the rank fit, at once), and
   `dask.array.store` streams it into a `.npy` file on disk. Beside it, the baseline of the same run: a backed AnnData
   (`read_h5ad(backed="r")`), which sc_c2s reads block by block but whose result is held in memory. Each runs in a
   fresh process, so that its peak resident memory (ru_maxrss) is its own.
3. Annotates `--annotate-cells` of those cells (constrained to the demo model's labels) with the bundled demo model in
   this process, then on a `distributed.LocalCluster` of `--workers` worker processes with one thread each, and
   checks that the labels agree.

Last run (2 shared cores, another job training beside it, load average 4.7;
`PYTHONPATH=src python benchmarks/bench_scale.py --annotate-cells 0 --dir /tmp/scale1m`, `xarray` installed for
`read_lazy`)::

    1,000,000 cells × 20,000 genes, ~1,000 expressed per cell: 7.51 GB on disk, written in 1303 s
    input                                        cells/s   seconds  peak RSS GB
    backed h5ad (result in memory; baseline)      15,434      64.8         1.35
    read_lazy → dask, stored to disk               8,237     121.4         1.29
      (of which the rank fit and the lazy graph: 34.7 s)
    identical gene indices: True

The annotation part was not run at that size (see docs/scaling.md for one process vs workers on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 2**20
GB = 2**30


# ---- data --------------------------------------------------------------------------------------------------------


def chunk_counts(rng: np.random.Generator, n_cells: int, n_genes: int, expressed: int):
    """CSR counts of `n_cells` cells with `expressed` genes each, drawn without a Python loop per cell."""
    from scipy import sparse

    popular = rng.permutation(n_genes)  # a gene's popularity ~ its place here: cells share their top genes
    first = (rng.pareto(1.2, size=(n_cells, expressed * 2)) * n_genes / 50).astype(np.int64) % n_genes
    genes = popular[first]
    genes.sort(axis=1)
    keep = np.ones_like(genes, dtype=bool)
    keep[:, 1:] = genes[:, 1:] != genes[:, :-1]
    rank = np.cumsum(keep, axis=1)
    keep &= rank <= expressed
    counts = 1 + rng.poisson(
        30.0 / (1 + rng.permuted(np.broadcast_to(np.arange(genes.shape[1]), genes.shape), axis=1)) ** 0.8
    )
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    return sparse.csr_matrix(
        (counts[keep].astype(np.float32), genes[keep].astype(np.int32), indptr), shape=(n_cells, n_genes)
    )


def write_synthetic(path: Path, *, n_cells: int, n_genes: int, expressed: int, chunk: int, seed: int = 0) -> float:
    """Write the h5ad chunk by chunk; return its size in GB."""
    import anndata as ad
    import h5py
    import pandas as pd

    try:
        from anndata.io import sparse_dataset, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)])
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        for start in range(0, n_cells, chunk):
            block = chunk_counts(rng, min(chunk, n_cells - start), n_genes, expressed)
            if start == 0:
                write_elem(f, "X", block)
            else:
                sparse_dataset(f["X"]).append(block)
    return path.stat().st_size / GB


# ---- out-of-core ranking, each in its own process --------------------------------------------------------------------

RANK = """
import json, resource, sys, time
import anndata as ad, numpy as np, scanpy as sc
import sc_c2s
sc.settings.verbosity = 0
path, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
if mode == "lazy":
    import dask.array as da
    from anndata.experimental import read_lazy
    adata = read_lazy(path)  # X: a dask array of CSR row chunks; obs and var lazy too
    sc_c2s.pp.to_sentences(adata, n_genes=200)
    fit = time.perf_counter() - start
    genes = adata.obsm["c2s_genes"]
    target = np.lib.format.open_memmap(out, mode="w+", dtype=genes.dtype, shape=genes.shape)
    da.store(genes, target)
    target.flush()
else:
    adata = ad.read_h5ad(path, backed="r")
    sc_c2s.pp.to_sentences(adata, n_genes=200, sentences=False)
    fit = float("nan")
    np.save(out, adata.obsm["c2s_genes"])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "until_lazy_result": fit, "peak_rss": peak, "n_cells": adata.n_obs}))
"""


def rank_in_process(path: Path, mode: str, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", RANK, str(path), mode, str(out)], capture_output=True, text=True)
    if result.returncode:
        msg = f"ranking the {mode} data failed:\n{result.stderr}"
        raise RuntimeError(msg)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- annotation ----------------------------------------------------------------------------------------------------


def annotate(path: Path, n_cells: int, n_workers: int) -> list[dict]:
    import anndata as ad
    import scanpy as sc
    import torch
    from distributed import Client, LocalCluster

    import sc_c2s

    sc.settings.verbosity = 0
    adata = ad.read_h5ad(path, backed="r")[:n_cells].to_memory()
    n_cells = adata.n_obs  # the file may hold fewer
    # no sentence strings: the gene list is replaced below, and strings of the old one would no longer match
    sc_c2s.pp.to_sentences(adata, n_genes=200, rank_fit=False, sentences=False)
    model = sc_c2s.models.load("demo")
    # the demo model knows its own genes, not the synthetic ones: the work per cell is what matters here
    adata.uns["c2s"]["genes"] = np.resize(np.asarray(model.metadata.vocabulary, dtype=object), adata.n_vars)
    rows = []
    torch.set_num_threads(n_workers)
    start = time.perf_counter()
    sc_c2s.tl.annotate(adata, model=model, labels="model")
    one = time.perf_counter() - start
    rows.append({"run": f"one process ({n_workers} torch threads)", "cells": n_cells, "seconds": one})
    expected = adata.obs["c2s_cell_type"].copy()
    with (
        LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: __import__("sc_c2s") and __import__("torch").set_num_threads(1))  # imports, not timed
        for run in ("first call: each worker loads the model", "second call: models loaded"):
            start = time.perf_counter()
            sc_c2s.tl.annotate(adata, model=model, labels="model", client=client)
            seconds = time.perf_counter() - start
            rows.append({"run": f"LocalCluster {n_workers}×1 thread, {run}", "cells": n_cells, "seconds": seconds})
    rows[-1]["same"] = bool((adata.obs["c2s_cell_type"] == expected).all())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=1_000_000, help="cells of the synthetic data")
    parser.add_argument("--n-genes", type=int, default=20_000, help="genes of the synthetic data")
    parser.add_argument("--expressed", type=int, default=1_000, help="about how many genes each cell expresses")
    parser.add_argument("--chunk", type=int, default=10_000, help="rows per chunk when writing")
    parser.add_argument("--annotate-cells", type=int, default=20_000, help="0: skip the annotation part")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes of the annotation part")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temporary one)")
    args = parser.parse_args()
    needed = {"xarray": "read_lazy of step 2", "dask": "step 2", "distributed": "the cluster of step 3"}
    if not args.annotate_cells:
        del needed["distributed"]
    missing = [f"{module} ({why})" for module, why in needed.items() if importlib.util.find_spec(module) is None]
    if missing:  # before writing gigabytes of data
        parser.error(f'missing {", ".join(missing)}: pip install xarray "sc-c2s[dask]"')

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "synthetic.h5ad"
        start = time.perf_counter()
        size = write_synthetic(
            path, n_cells=args.n_cells, n_genes=args.n_genes, expressed=args.expressed, chunk=args.chunk
        )
        print(
            f"{args.n_cells:,} cells × {args.n_genes:,} genes, ~{args.expressed:,} expressed per cell: {size:.2f} GB "
            f"on disk, written in {time.perf_counter() - start:.0f} s; {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        print("\nto_sentences(adata, n_genes=200), in a fresh process each")
        print(f"{'input':<42}{'cells/s':>10}{'seconds':>10}{'peak RSS GB':>13}")
        for mode, label in [
            ("backed", "backed h5ad (result in memory; baseline)"),
            ("lazy", "read_lazy → dask, stored to disk"),
        ]:
            r = rank_in_process(path, mode, Path(tmp) / f"{mode}.npy")
            print(f"{label:<42}{r['n_cells'] / r['seconds']:>10,.0f}{r['seconds']:>10.1f}{r['peak_rss'] / GB:>13.2f}")
            if mode == "lazy":
                print(f"  (of which the rank fit and the lazy graph: {r['until_lazy_result']:.1f} s)")
        same = np.array_equal(np.load(Path(tmp) / "backed.npy"), np.load(Path(tmp) / "lazy.npy", mmap_mode="r"))
        print(f"identical gene indices: {same}")
        if not args.annotate_cells:
            return

        print(f"\nannotate(labels='model') with the demo model on {args.annotate_cells:,} cells")
        rows = annotate(path, args.annotate_cells, args.workers)
        print(f"{'run':<66}{'cells/s':>10}{'seconds':>10}{'speed-up':>10}")
        for row in rows:
            print(
                f"{row['run']:<66}{row['cells'] / row['seconds']:>10,.1f}{row['seconds']:>10.1f}"
                f"{rows[0]['seconds'] / row['seconds']:>9.2f}×"
            )
        print(f"same labels in one process and on the cluster: {rows[-1]['same']}")


if __name__ == "__main__":
    main()
