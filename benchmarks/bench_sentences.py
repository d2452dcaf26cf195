"""Speed and memory of `sc_c2s.pp.to_sentences` beside a numpy per-row argsort and the reference `cell2sentence`.

Run from the repository root::

    python benchmarks/bench_sentences.py

With ``--previous REV`` it times instead the calls below beside the ranking kernels of git revision ``REV``
(``src/sc_c2s/pp/_kernels.py`` there, swapped into this process), calls interleaved: how much a change to the
kernels moved them, free of the drift between runs on a shared machine::

    python benchmarks/bench_sentences.py --previous 3e1012a

The reference column needs `cell2sentence` (CC BY-NC-ND, so not a dependency); install it in a throwaway venv that
sees this environment and run the script with that venv's python::

    python -m venv --system-site-packages /tmp/refenv
    /tmp/refenv/bin/pip install cell2sentence datasets plotnine accelerate
    /tmp/refenv/bin/python benchmarks/bench_sentences.py

Figures are wall-clock cells per second, the best of `--repeats` runs (more for calls under 2 s), on
`scanpy.settings.n_jobs` threads (`--n-jobs`, default all cores). Slow baselines run on the first
`--baseline-cells` cells. Peak memory is the most memory allocated at once during one call (tracemalloc), beside
the input already held.

Last run (2 cores, load average 1.4 at the start;
`PYTHONPATH=src /tmp/refenv/bin/python benchmarks/bench_sentences.py --repeats 3`, reference installed with
`pip install --no-deps cell2sentence` then `pip install datasets plotnine accelerate`)::

    call                                                      cells/s   × numpy   × cell2sentence
    CellBench, default to_sentences(adata, n_genes=200)        26,968       6.7              57.8
    CellBench, the same without the rank fit                   38,826       9.7              83.3
    CellBench ×36 (50,688 cells), default call                 36,208      10.2              64.0
    CellBench ×36, all genes as strings (20,000 cells)          8,727       4.8              15.4
    synthetic 100k, top 200, no strings, no rank fit          163,539      13.0
    CellBench log-normalised, default call                     19,090   (33,839 without the rank fit)

The rank fit took 31 % of the default call on CellBench (all 1,408 cells are in its sample), none at 50,688 cells,
and 44 % of the call on the same cells log-normalised (``normalize_total`` and ``log1p``, as scanpy's tutorials keep
in ``.raw``). Figures of this machine vary between runs by more than the changes measured here: in three runs of one
session the reference read 295, 383 and 466 cells/s on CellBench, and the synthetic top-200 row 8.7× and 13.0×
numpy in two runs of the same code. Against the kernels before this round's ranking changes, in three comparisons
(``--previous 3e1012a`` twice, and once an ad-hoc script doing the same), sentences of all genes as strings on
CellBench ×7 ran 1.36×, 1.45× and 1.52× as fast (words copied as 8- or 16-byte blocks, fewer radix passes); the
other calls moved from one comparison to the next without a clear direction: all genes without strings 0.86×,
1.18×, 1.40× on CellBench ×7 and 1.12×, 1.26×, 1.66× on synthetic cells, the synthetic top-200 call 0.98×, 1.07×,
1.83×, the default call on CellBench 1.00×, 1.04×, 1.23×.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scanpy as sc
from anndata.utils import make_index_unique
from scipy import sparse

import sc_c2s

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


# ---- data --------------------------------------------------------------------------------------------------------


def cellbench(path: Path) -> ad.AnnData:
    """CellBench counts with gene symbols as `var_names` (the reference reads the words from there)."""
    adata = ad.read_h5ad(path)
    symbols = adata.var["gene_symbol"].astype(object).where(adata.var["gene_symbol"].notna(), adata.var_names)
    adata.var_names = make_index_unique(pd.Index(symbols.astype(str)))
    return ad.AnnData(sparse.csr_matrix(adata.X, dtype=np.float32), var=pd.DataFrame(index=adata.var_names))


def synthetic(n_cells: int, n_genes: int, expressed: int, seed: int = 0) -> ad.AnnData:
    """Counts (geometric, p = 0.3: mostly 1-5, so many ties) of `expressed` genes per cell, CSR float32.

    Each cell expresses a rotation of one of 64 random gene sets, so the rows differ without a sort per row.
    """
    rng = np.random.default_rng(seed)
    bases = [np.sort(rng.choice(n_genes, expressed, replace=False)).astype(np.int32) for _ in range(64)]
    indices = np.empty(n_cells * expressed, dtype=np.int32)
    offsets = rng.integers(0, n_genes, n_cells)
    which = rng.integers(0, len(bases), n_cells)
    for i in range(n_cells):
        base, offset = bases[which[i]], offsets[i]
        wrap = np.searchsorted(base, n_genes - offset)
        row = indices[i * expressed : (i + 1) * expressed]
        row[: expressed - wrap] = base[wrap:] + (offset - n_genes)
        row[expressed - wrap :] = base[:wrap] + offset
    data = rng.geometric(0.3, size=n_cells * expressed).astype(np.float32)
    indptr = np.arange(0, n_cells * expressed + 1, expressed, dtype=np.int64)
    X = sparse.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    names = pd.Index([f"G{j:05d}" for j in range(n_genes)])
    return ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=pd.DataFrame(index=names))


# ---- measurement -------------------------------------------------------------------------------------------------


def traced_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """Peak of the memory allocated during `fn()` and what is still held after it (the output), in MiB.

    Counts what Python and numpy allocate (tracemalloc), not the few MB of scratch that numba's threads hold.
    """
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    fn()
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (peak - before) / MB, (after - before) / MB


def best_time(fn: Callable[[], object], repeats: int, min_seconds: float = 2.0) -> tuple[float, float]:
    """Best wall-clock seconds and best CPU seconds (all threads of the process) over `repeats` calls or more.

    Calls are repeated until `min_seconds` have passed (the collections between them included): the best of a few
    calls of a tenth of a second varies by a fifth between runs on a shared machine.
    """
    wall, cpu = [], []
    begin = time.perf_counter()
    while len(wall) < repeats or time.perf_counter() - begin < min_seconds:
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def numpy_baseline(X: sparse.csr_matrix, n_genes: int | None, names: np.ndarray | None) -> None:
    """Per-row `np.argsort` of the stored values, descending; the gene words joined if `names` is given."""
    indptr, indices, data = X.indptr, X.indices, X.data
    for i in range(X.shape[0]):
        start, stop = indptr[i], indptr[i + 1]
        genes = indices[start:stop][np.argsort(-data[start:stop], kind="stable")[:n_genes]]
        if names is not None:
            " ".join(names[genes])


def reference(adata: ad.AnnData) -> None:
    """The reference package: its vocabulary, then its sentences (all expressed genes, as strings)."""
    from cell2sentence import utils

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        vocabulary = utils.generate_vocabulary(adata)
        utils.generate_sentences(adata, vocabulary)


def clear(adata: ad.AnnData) -> None:
    adata.obsm.pop("c2s_genes", None)
    adata.uns.pop("c2s", None)
    if "c2s_sentence" in adata.obs:
        del adata.obs["c2s_sentence"]


def input_mb(X: sparse.csr_matrix) -> float:
    return (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / MB


def import_time(repeats: int = 5) -> tuple[float, float, bool]:
    """Median seconds of `import scanpy` and of `import sc_c2s` after it, each in a fresh interpreter."""
    code = (
        "import sys, time; t0 = time.perf_counter(); import scanpy; t1 = time.perf_counter(); import sc_c2s; "
        "t2 = time.perf_counter(); print(t1 - t0, t2 - t1, 'torch' in sys.modules or 'transformers' in sys.modules)"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        for _ in range(repeats)
    ]
    return (
        statistics.median(float(r[0]) for r in runs),
        statistics.median(float(r[1]) for r in runs),
        any(r[2] == "True" for r in runs),
    )


# ---- the benchmark -----------------------------------------------------------------------------------------------


def bench(name: str, adata: ad.AnnData, args: argparse.Namespace, has_reference: bool) -> list[dict]:
    X = adata.X
    names = adata.var_names.to_numpy()
    n_base = min(args.baseline_cells, adata.n_obs)
    small = adata[:n_base].copy()
    rows = []

    def add(method, n_genes, strings, cells, seconds, peak=np.nan, output=np.nan):
        wall, cpu = seconds
        rows.append(
            {
                "data": name,
                "method": method,
                "genes": "all" if n_genes is None else f"top {n_genes}",
                "strings": "yes" if strings else "no",
                "cells": cells,
                "cells/s": cells / wall,
                "cells/CPU-s": cells / cpu,
                "peak MiB": peak,
                "output MiB": output,
            }
        )

    for n_genes in (200, None):
        for strings in (False, True):
            target = adata
            if n_genes is None and strings and adata.n_obs > args.full_cells:
                target = adata[: args.full_cells].copy()  # full sentences as strings of 100,000 cells: many GB

            def run(target=target, n_genes=n_genes, strings=strings):
                sc_c2s.pp.to_sentences(target, n_genes=n_genes, sentences=strings, rank_fit=False)

            seconds = best_time(run, args.repeats)
            clear(target)
            peak, output = traced_mb(run)
            clear(target)
            add("sc_c2s", n_genes, strings, target.n_obs, seconds, peak, output)
            if n_genes == 200 and strings:
                seconds = best_time(lambda target=target: sc_c2s.pp.to_sentences(target, n_genes=200), args.repeats)
                clear(target)
                add("sc_c2s + rank fit (2,000 cells)", 200, True, target.n_obs, seconds)
            baseline = partial(numpy_baseline, small.X, n_genes, names if strings else None)
            add("numpy argsort per row", n_genes, strings, n_base, best_time(baseline, 1), *traced_mb(baseline))
    if has_reference:
        seconds = best_time(lambda: reference(small), 1)
        add("cell2sentence", None, True, n_base, seconds)
    print(
        f"\n{name}: {adata.n_obs:,} cells × {adata.n_vars:,} genes, {X.nnz / adata.n_obs:,.0f} expressed per cell, "
        f"input (CSR arrays) {input_mb(X):,.0f} MiB"
    )
    return rows


def log_normalised_fit(adata: ad.AnnData, repeats: int) -> str:
    """The default call on log-normalised expression (``normalize_total`` + ``log1p``, as scanpy's tutorials keep in
    ``.raw``), with and without the rank fit, which then undoes the ``log1p`` to normalise the cells it fits on."""
    lognorm = adata.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    rates = {}
    for rank_fit in (True, False):
        seconds = best_time(
            lambda rank_fit=rank_fit: sc_c2s.pp.to_sentences(lognorm, n_genes=200, rank_fit=rank_fit), repeats
        )
        rates[rank_fit] = lognorm.n_obs / seconds[0]
    share = 1 - rates[True] / rates[False]
    return (
        f"CellBench log-normalised: to_sentences(adata, n_genes=200) {rates[True]:,.0f} cells/s, "
        f"{rates[False]:,.0f} without the rank fit: the fit takes {share:.0%}"
    )


def previous_kernels(revision: str):
    """Import the ranking kernels of git revision `revision` as a module of their own (they need only numpy, numba)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/sc_c2s/pp/_kernels.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "previous_kernels.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_kernels(revision: str, cells: ad.AnnData | None, args: argparse.Namespace) -> None:
    """Time each call with this checkout's kernels and with those of `revision`, interleaved; print the best."""
    from sc_c2s import _rank_model
    from sc_c2s.pp import _kernels, _rank, _to_sentences

    modules = (_rank, _to_sentences, _rank_model)  # those that call the kernels

    def use(kernels) -> None:
        for module in modules:
            module._kernels = kernels

    versions = {revision: previous_kernels(revision), "this checkout": _kernels}
    calls = []
    if cells is not None:
        tiled = ad.AnnData(sparse.vstack([cells.X] * 7, format="csr"), var=cells.var)
        calls += [
            ("CellBench, default call (top 200, strings, rank fit)", cells, {"n_genes": 200}),
            ("CellBench ×7, all genes as strings", tiled, {"rank_fit": False}),
            ("CellBench ×7, all genes, no strings", tiled, {"rank_fit": False, "sentences": False}),
        ]
    data = synthetic(args.n_cells // 2, args.n_genes, args.expressed)
    calls += [
        (
            f"synthetic {data.n_obs:,}, top 200, no strings, no fit",
            data,
            {"n_genes": 200, "sentences": False, "rank_fit": False},
        ),
        (f"synthetic {data.n_obs:,}, all genes, no strings", data, {"rank_fit": False, "sentences": False}),
    ]
    print(f"\ncells/s, best of {args.repeats + 1} calls each after a first, interleaved:")
    print(f"{'call':52s} {revision:>14s} {'this checkout':>14s}   ratio")
    for name, adata, kwargs in calls:
        seconds = {version: [] for version in versions}
        for _ in range(args.repeats + 2):
            for version, kernels in versions.items():
                use(kernels)
                gc.collect()
                start = time.perf_counter()
                sc_c2s.pp.to_sentences(adata, **kwargs)
                seconds[version].append(time.perf_counter() - start)
        before, after = (adata.n_obs / min(seconds[version][1:]) for version in versions)
        print(f"{name:52s} {before:14,.0f} {after:14,.0f}   {after / before:.2f}×", flush=True)
    use(_kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "cellbench_5cl_counts.h5ad",
        help="CellBench counts, tiled for the first table (default: the shared copy)",
    )
    parser.add_argument(
        "--tiled-cells", type=int, default=50_000, help="CellBench tiled to about this many cells; 0: skip"
    )
    parser.add_argument("--n-cells", type=int, default=100_000, help="cells of the synthetic data")
    parser.add_argument("--n-genes", type=int, default=20_000, help="genes of the synthetic data")
    parser.add_argument("--expressed", type=int, default=2_000, help="genes expressed per synthetic cell")
    parser.add_argument("--baseline-cells", type=int, default=5_000, help="cells for the numpy and reference runs")
    parser.add_argument("--full-cells", type=int, default=20_000, help="cells for full sentences as strings")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each run, at least")
    parser.add_argument("--n-jobs", type=int, default=-1, help="scanpy.settings.n_jobs (-1: all cores)")
    parser.add_argument("--previous", metavar="REV", help="compare with the ranking kernels of this git revision")
    args = parser.parse_args()

    sc.settings.n_jobs = args.n_jobs
    sc.settings.verbosity = 0
    try:
        import cell2sentence  # noqa: F401
    except ImportError:
        has_reference = False
    else:
        has_reference = True
    print(
        f"sc_c2s {sc_c2s.__version__}, numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} cores, "
        f"scanpy.settings.n_jobs={args.n_jobs}, load average {os.getloadavg()[0]:.1f}; "
        f"reference cell2sentence {'importable' if has_reference else 'not importable: column skipped'}"
    )
    warm = synthetic(50, 300, 30)  # load the compiled kernels before timing
    sc_c2s.pp.to_sentences(warm, n_genes=10)
    sc_c2s.pp.to_sentences(warm)

    if args.previous:
        compare_kernels(args.previous, cellbench(args.data) if args.data.exists() else None, args)
        return
    rows = []
    if args.data.exists():
        cells = cellbench(args.data)
        rows += bench("CellBench", cells, args, has_reference)
        fit_line = log_normalised_fit(cells, args.repeats)
        if args.tiled_cells:
            copies = max(1, round(args.tiled_cells / cells.n_obs))
            tiled = ad.AnnData(sparse.vstack([cells.X] * copies, format="csr"), var=cells.var)
            rows += bench(f"CellBench ×{tiled.n_obs // cells.n_obs}", tiled, args, has_reference)
    else:
        print(f"{args.data} not found: CellBench skipped")
    start = time.perf_counter()
    data = synthetic(args.n_cells, args.n_genes, args.expressed)
    print(f"(synthetic matrix built in {time.perf_counter() - start:.0f} s)")
    rows += bench("synthetic", data, args, has_reference)

    table = pd.DataFrame(rows)
    table["× numpy"] = np.nan
    if has_reference:
        table["× cell2sentence"] = np.nan
    for (name, _, strings), group in table.groupby(["data", "genes", "strings"], sort=False):
        numpy_rate = group.loc[group["method"] == "numpy argsort per row", "cells/s"]
        ref = table.loc[(table["data"] == name) & (table["method"] == "cell2sentence"), "cells/s"]
        if len(numpy_rate):
            table.loc[group.index, "× numpy"] = group["cells/s"] / numpy_rate.iloc[0]
        if strings == "yes" and len(ref):
            table.loc[group.index, "× cell2sentence"] = group["cells/s"] / ref.iloc[0]
    table["peak - output MiB"] = table["peak MiB"] - table["output MiB"]

    def number(digits: int) -> Callable[[float], str]:
        return lambda v: f"{v:,.{digits}f}"  # pandas prints `na_rep` for NaN without calling the formatter

    formatters = {"cells": "{:,}".format, "× numpy": number(1), "× cell2sentence": number(1)}
    formatters |= {key: number(0) for key in ["cells/s", "cells/CPU-s", "peak MiB", "output MiB", "peak - output MiB"]}
    print()
    print(table.to_string(index=False, formatters=formatters, na_rep=""))
    print(
        "\ncells/s: wall clock; cells/CPU-s: per second of CPU time summed over threads (steady under load: on an idle"
        " machine, n cores give about n times it); × numpy, × cell2sentence: ratios of wall-clock cells/s (the"
        " reference ranks all genes and writes strings; it is compared with every row that writes strings).\n"
        "peak MiB: most memory allocated at once during the call (tracemalloc), beside the input already held;"
        " output MiB: what the call added to the AnnData; target: peak - output ≤ 200 MiB."
    )
    default = table[(table["genes"] == "top 200") & (table["strings"] == "yes")]
    for name, group in default.groupby("data", sort=False):
        rate = group.set_index("method")["cells/s"]
        if "sc_c2s + rank fit (2,000 cells)" in rate and "sc_c2s" in rate:
            with_fit, without = 1 / rate["sc_c2s + rank fit (2,000 cells)"], 1 / rate["sc_c2s"]
            print(
                f"{name}: the rank fit takes {(with_fit - without) / with_fit:.0%} of a default call "
                f"(to_sentences(adata, n_genes=200); target ≤ 15 %)"
            )
    if args.data.exists():
        print(fit_line)
    scanpy_s, c2s_s, heavy = import_time()
    print(
        f"import scanpy {scanpy_s:.2f} s; import sc_c2s after it {c2s_s:.3f} s (target ≤ 0.3 s); "
        f"torch or transformers imported: {heavy}"
    )


if __name__ == "__main__":
    main()
