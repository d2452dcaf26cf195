"""Dask: lazy ranking of dask arrays, and the model verbs over row chunks on a 2-worker cluster.

The results must be those of the in-memory path: the same gene indices, labels and embeddings; scores agree to
float32 rounding (cells are batched with others of similar token length, so a chunk pads them differently).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import sc_c2s
from sc_c2s import _dask

da = pytest.importorskip("dask.array")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Clusters here serve their dashboard on any free port (`dashboard_address=":0"`): `None` takes 8787, and warns (an
# error in these tests) when another cluster on the machine holds it.

N_GENES = 30
#: Genes of the free annotation: the demo model, asked about fewer genes than it was trained on (200), continues some
#: of these sentences instead of naming a type (6 of the 100 cells), so its warning comes from the workers' tasks.
FREE_N_GENES = 12


def lazy(adata: ad.AnnData, *, dense: bool = False, rows: int = 120) -> ad.AnnData:
    """A copy whose X is a dask array of row chunks: scipy CSR chunks, or dense ones split over columns too."""
    X = adata.X.toarray() if dense else sparse.csr_matrix(adata.X)
    out = adata.copy()
    out.X = da.from_array(X, chunks=(rows, 700) if dense else (rows, -1), asarray=False)
    return out


@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_to_sentences_on_dask_equals_in_memory(container, pbmc4k, dense):
    expected = pbmc4k.copy()
    sc_c2s.pp.to_sentences(expected, n_genes=100)
    data = container.wrap(lazy(pbmc4k, dense=dense))
    sc_c2s.pp.to_sentences(data, n_genes=100)
    result = container.rna(data)
    genes = result.obsm["c2s_genes"]
    assert _dask.is_dask_array(genes)
    assert genes.chunks[0] == (120, 120, 120, 120, 20)
    np.testing.assert_array_equal(genes.compute(), expected.obsm["c2s_genes"])
    assert "c2s_sentence" not in result.obs  # strings are opt-in for dask input
    fit, expected_fit = result.uns["c2s"]["rank_fit"], expected.uns["c2s"]["rank_fit"]
    numbers = {k for k, v in expected_fit.items() if isinstance(v, float)}  # pytest 9.2's approx refuses strings
    assert {k: fit[k] for k in numbers} == pytest.approx({k: expected_fit[k] for k in numbers}, rel=1e-12)
    assert {k: v for k, v in fit.items() if k not in numbers} == {
        k: v for k, v in expected_fit.items() if k not in numbers
    }
    params = {**expected.uns["c2s"]["params"], "sentences": False}  # the default for dask input
    if container.is_mudata:
        params["mod"] = "rna"
    assert result.uns["c2s"]["params"] == params


def test_to_sentences_on_dask_all_genes_and_strings(pbmc4k):
    expected = pbmc4k.copy()
    sc_c2s.pp.to_sentences(expected, rank_fit=False)
    data = lazy(pbmc4k)
    sc_c2s.pp.to_sentences(data, sentences=True, rank_fit=False)
    np.testing.assert_array_equal(data.obsm["c2s_genes"].compute(), expected.obsm["c2s_genes"])
    pd.testing.assert_series_equal(data.obs["c2s_sentence"], expected.obs["c2s_sentence"])


def test_to_sentences_on_dask_keeps_n_genes_columns():
    """A lazy result cannot know that no cell reaches `n_genes` without reading everything: it pads with -1."""
    X = np.array([[0, 3, 1, 0], [2, 0, 0, 0]], dtype=np.float32)
    adata = ad.AnnData(X)
    adata.X = da.from_array(X, chunks=(1, -1))
    sc_c2s.pp.to_sentences(adata, n_genes=3, rank_fit=False)
    np.testing.assert_array_equal(adata.obsm["c2s_genes"].compute(), [[1, 2, -1], [0, -1, -1]])


def test_to_sentences_on_dask_counts_genes_as_in_memory():
    """Without `n_genes`, as many columns as the longest sentence: stored zeros and a gene stored twice used to count
    as entries, padding every row with -1."""
    zeros = sparse.csr_matrix(([3, 0, 2], [1, 2, 0], [0, 2, 3]), shape=(2, 4), dtype=np.float32)
    twice = sparse.csr_matrix(([1, 1, 2], [1, 1, 0], [0, 2, 3]), shape=(2, 4), dtype=np.float32)
    for X in (zeros, twice):
        expected, adata = ad.AnnData(X.copy()), ad.AnnData(da.from_array(X, chunks=(1, -1), asarray=False))
        sc_c2s.pp.to_sentences(expected, rank_fit=False)
        sc_c2s.pp.to_sentences(adata, rank_fit=False)
        assert expected.obsm["c2s_genes"].tolist() == [[1], [0]]
        np.testing.assert_array_equal(adata.obsm["c2s_genes"].compute(), expected.obsm["c2s_genes"])


def test_the_rank_fit_samples_rows_of_coo_chunks(pbmc4k):
    """The ranking read COO chunks, the fit's sample of rows failed on them: 'coo_matrix' is not subscriptable."""
    expected = pbmc4k.copy()
    sc_c2s.pp.to_sentences(expected, n_genes=10, rank_fit=100)
    adata = lazy(pbmc4k)
    adata.X = adata.X.map_blocks(sparse.coo_matrix, dtype=adata.X.dtype)
    sc_c2s.pp.to_sentences(adata, n_genes=10, rank_fit=100)
    assert adata.uns["c2s"]["rank_fit"] == expected.uns["c2s"]["rank_fit"]
    np.testing.assert_array_equal(adata.obsm["c2s_genes"].compute(), expected.obsm["c2s_genes"])


def test_gene_indices_ranked_with_strings_outlive_the_client(pbmc4k):
    """They were persisted on the client's workers: computing them (or writing the h5ad) after it closed failed."""
    distributed = pytest.importorskip("distributed")
    expected = pbmc4k[:200].copy()
    sc_c2s.pp.to_sentences(expected, n_genes=10, rank_fit=False)
    adata = lazy(pbmc4k[:200])
    with (
        distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
        distributed.Client(cluster),
    ):
        sc_c2s.pp.to_sentences(adata, n_genes=10, sentences=True, rank_fit=False)
    genes = adata.obsm["c2s_genes"]
    assert _dask.is_dask_array(genes)
    assert genes.chunks[0] == (120, 80)
    np.testing.assert_array_equal(genes.compute(), expected.obsm["c2s_genes"])
    pd.testing.assert_series_equal(adata.obs["c2s_sentence"], expected.obs["c2s_sentence"])


def test_a_failing_job_cancels_its_other_tasks(tmp_path):
    """After one task failed (or Ctrl-C), the cluster went on with the rest, whose results nobody would read."""
    dask = pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    ran = tmp_path / "ran"

    def chunk(i: int) -> None:
        with ran.open("a") as f:
            f.write(f"{i}\n")
        time.sleep(0.3)
        msg = f"chunk {i} failed"
        raise RuntimeError(msg)

    tasks = [dask.delayed(chunk, pure=False)(i) for i in range(8)]
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
    ):
        with pytest.raises(RuntimeError, match="failed"):
            _dask._compute(tasks, client)
        time.sleep(3)  # the other seven chunks, had they gone on, would have run meanwhile
    assert len(ran.read_text().split()) <= 3  # the failing one, and those the worker started before the cancel


def test_a_client_that_cannot_cancel_shows_the_jobs_error():
    """A cluster that died with the job: the error of the cancel hid the job's."""

    class DeadClient:
        def compute(self, tasks):
            return tasks

        def gather(self, futures):
            raise RuntimeError("the job failed")

        def cancel(self, futures):
            raise ConnectionError("Client is closed")

    with pytest.raises(RuntimeError, match="the job failed"):
        _dask._compute([1, 2], DeadClient())


def test_to_sentences_on_dask_checks_values_when_computed():
    X = np.array([[1, 2], [-1, 0]], dtype=np.float32)
    adata = ad.AnnData(X)
    adata.X = da.from_array(X, chunks=(1, -1))
    sc_c2s.pp.to_sentences(adata, n_genes=2, rank_fit=False)
    with pytest.raises(ValueError, match=r"`X` holds negative values \(first in cell 1\)"):
        adata.obsm["c2s_genes"].compute()


def test_to_sentences_on_dask_with_numba_workqueue_threads():
    """Dask's threads rank chunks at once: numba's workqueue layer (no OpenMP library, e.g. slim images) aborted."""
    code = textwrap.dedent(
        """
        import dask.array as da, numba, scanpy as sc, sc_c2s
        from scipy import sparse
        adata = sc.datasets.pbmc68k_reduced().raw.to_adata()
        adata.X = sparse.csr_matrix(adata.X)
        lazy = adata.copy()
        lazy.X = da.from_array(adata.X, chunks=(10, -1), asarray=False)
        sc_c2s.pp.to_sentences(adata, n_genes=50)
        for _ in range(3):
            sc_c2s.pp.to_sentences(lazy, n_genes=50)
            genes = lazy.obsm["c2s_genes"].compute(scheduler="threads", num_workers=2)
            assert (genes == adata.obsm["c2s_genes"]).all()
        print(numba.threading_layer())
        """
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "workqueue"


def test_sc_c2s_works_without_dask():
    code = (
        "import sys; sys.modules['dask'] = sys.modules['distributed'] = None\n"
        "import scanpy as sc, sc_c2s\n"
        "adata = sc.datasets.pbmc68k_reduced()\n"
        "sc_c2s.pp.to_sentences(adata, n_genes=5)\n"
        "print(type(adata.obsm['c2s_genes']).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "ndarray"


def test_dask_without_distributed():
    """dask alone, without the `distributed` of the `dask` extra: ranking and the verbs on dask arrays run here."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["distributed"] = None  # as if not installed
        import anndata as ad, dask.array as da, numpy as np, scanpy as sc, sc_c2s
        X = np.array([[0, 3, 1], [2, 0, 0]], dtype=np.float32)
        adata = ad.AnnData(da.from_array(X, chunks=(1, -1)))
        sc_c2s.pp.to_sentences(adata, rank_fit=False)
        print(adata.obsm["c2s_genes"].compute().tolist())
        cells = sc.datasets.pbmc68k_reduced()[:20].copy()
        sc_c2s.pp.to_sentences(cells, n_genes=30)
        lazy = cells.copy()
        lazy.obsm["c2s_genes"] = da.from_array(cells.obsm["c2s_genes"], chunks=(8, -1))
        sc_c2s.tl.embed(cells, model="demo", n_genes=30)
        sc_c2s.tl.embed(lazy, model="demo", n_genes=30)
        print(np.array_equal(lazy.obsm["X_c2s"], cells.obsm["X_c2s"]))
        try:
            sc_c2s.tl.embed(cells, model="demo", client=object())
        except ImportError as error:
            print(error)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "[[1, 2], [0, -1]]",  # 3 > 1 in the first cell; -1 pads the second cell's one gene
        "True",
        'Running models over a Dask cluster needs the `distributed` package: `pip install "sc-c2s[dask]"`.',
    ]


# ---- the model verbs -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return sc_c2s.models.load("demo")


@pytest.fixture(scope="module")
def sentences(_pbmc68k) -> ad.AnnData:
    """100 PBMCs with sentences."""
    adata = _pbmc68k[:100].copy()
    sc_c2s.pp.to_sentences(adata, n_genes=N_GENES)
    return adata


@pytest.fixture(scope="module")
def expected(sentences, demo) -> ad.AnnData:
    adata = sentences.copy()
    run_verbs(adata, demo)
    return adata


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


# Two threads per worker, as the SLURM recipe of docs/scaling.md has eight: they used to import transformers at once
# (ImportError) and each load the model.
# Scores and embeddings are float32 model outputs. A worker runs torch on one thread and this process on two, and the
# chunks pad their batches to other lengths, so sums are taken in other orders: once in CI one score of 0.608 came out
# 1.6e-6 apart. A few float32 ulps of relative error is that; a cell read in the wrong row is off by far more.
FLOAT32_OUTPUTS = {"rtol": 1e-5, "atol": 1e-6}


def assert_same_results(result: ad.AnnData, expected: ad.AnnData) -> None:
    for key in ("c2s_cell_type", "free"):
        pd.testing.assert_series_equal(result.obs[key], expected.obs[key])  # labels and categories
        np.testing.assert_allclose(result.obs[f"{key}_score"], expected.obs[f"{key}_score"], **FLOAT32_OUTPUTS)
        assert result.uns[key] == expected.uns[key]
    np.testing.assert_allclose(result.obsm["X_c2s"], expected.obsm["X_c2s"], **FLOAT32_OUTPUTS)
    assert result.uns["X_c2s"] == expected.uns["X_c2s"]


def run_verbs(adata: ad.AnnData, model, **kwargs) -> None:
    sc_c2s.tl.annotate(adata, model=model, labels="model", n_genes=N_GENES, **kwargs)
    with pytest.warns(UserWarning, match="answers are lists of genes"):  # here or on a worker
        sc_c2s.tl.annotate(adata, model=model, n_genes=FREE_N_GENES, key_added="free", **kwargs)
    sc_c2s.tl.embed(adata, model=model, n_genes=N_GENES, **kwargs)


@pytest.mark.slow  # a cluster of two worker processes, each importing torch and loading the model: ~1 min here
def test_verbs_over_a_cluster_equal_in_memory(sentences, expected, demo, client):
    adata = sentences.copy()
    run_verbs(adata, demo, client=client)
    assert_same_results(adata, expected)

    lazy_sentences = sentences.copy()
    lazy_sentences.obsm["c2s_genes"] = da.from_array(sentences.obsm["c2s_genes"], chunks=(30, -1))
    run_verbs(lazy_sentences, "demo")  # a dask obsm runs on the active client
    assert_same_results(lazy_sentences, expected)

    request = {"model": demo, "cell_types": {"CD14+ Monocyte": 7, "CD19+ B": 6}, "n_genes": 20}
    generated = sc_c2s.tl.generate(sentences, client=client, **request)
    in_memory = sc_c2s.tl.generate(sentences, **request)
    pd.testing.assert_frame_equal(generated.obs, in_memory.obs)  # the same sentences, read the same way
    assert (generated.X != in_memory.X).nnz == 0
    assert generated.uns == in_memory.uns

    loads = client.run(lambda: (dict(_dask.LOADS), len(_dask._MODELS)))
    assert len(loads) == 2
    # the demo model in float32, then "demo" in the default dtype, which then serves the demo model too; which
    # worker runs which task is the scheduler's choice, so a worker may have needed only one of them
    assert {ref for per_worker, _ in loads.values() for ref in per_worker} == {
        _dask.reference(demo, device=None),
        _dask.reference("demo", device=None),
    }
    for per_worker, held in loads.values():  # each loaded once, whatever the number of chunks and threads
        assert set(per_worker.values()) == {1}
        assert held == 1


def test_verbs_on_dask_sentences_without_a_cluster(sentences, expected, demo):
    """Without a client, the chunks run one after another in this process, with the model given."""
    adata = sentences.copy()
    adata.obsm["c2s_genes"] = da.from_array(sentences.obsm["c2s_genes"], chunks=(64, -1))  # 64 + 36 cells
    loads = dict(_dask.LOADS)
    run_verbs(adata, demo)
    assert_same_results(adata, expected)
    assert dict(_dask.LOADS) == loads  # the loaded model was used, not loaded again


def test_a_loaded_model_goes_to_the_device_asked_for(sentences, demo, monkeypatch):
    """Tasks in this process ran a loaded model where it was, whatever `device=`: in memory the verb moves it there,
    or refuses a device that does not exist."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for data in (sentences[:20].copy(), lazy_genes(sentences[:20], 10)):
        with pytest.raises(ValueError, match=r"^`device='cuda:3'` but no CUDA device is available"):
            sc_c2s.tl.embed(data, model=demo, n_genes=N_GENES, device="cuda:3")
        assert "X_c2s" not in data.obsm


def test_model_reference():
    assert _dask.reference("demo", device=None) == _dask.ModelReference("demo", None, None, None)
    assert _dask.reference("/some/dir", device="cuda:1").device == "cuda:1"


def test_to_sentences_on_dask_has_at_most_n_vars_columns():
    """As documented: `min(n_genes, n_vars)` columns with `n_genes`, the longest sentence without."""
    X = np.array([[0, 3, 1, 0], [2, 0, 0, 0]], dtype=np.float32)
    for n_genes, width in [(1000, 4), (None, 2)]:
        adata = ad.AnnData(X)
        adata.X = da.from_array(X, chunks=(1, -1))
        sc_c2s.pp.to_sentences(adata, n_genes=n_genes, rank_fit=False)
        assert adata.obsm["c2s_genes"].shape == (2, width)


class EightWorkers:
    """A stand-in client of 8 workers whose `scheduler_info` lists 5 of them, as distributed 2025.5 to 2025.12 do."""

    def nthreads(self) -> dict[str, int]:
        return {f"tcp://127.0.0.1:{port}": 1 for port in range(8)}

    def scheduler_info(self, n_workers: int = 5) -> dict:
        return {"workers": dict(list(self.nthreads().items())[:n_workers])}


def test_sentences_are_cut_into_chunks_for_every_worker():
    """Counted by `scheduler_info`, a cluster of 8 workers got the chunks of 5, and 3 workers idled."""
    genes = _dask._row_chunks(np.zeros((320, 3), dtype=np.int32), EightWorkers())
    assert genes.numblocks == (4 * 8, 1)
    assert _dask._row_chunks(np.zeros((320, 3), dtype=np.int32), None).numblocks == (4, 1)


def test_a_client_that_is_not_one_or_is_closed_is_refused(sentences, demo):
    """Used to fail inside, on `client.scheduler_info()["workers"]` (KeyError, or no such attribute)."""
    distributed = pytest.importorskip("distributed")
    with pytest.raises(TypeError, match=r"`client` must be a `distributed.Client`, got str"):
        sc_c2s.tl.embed(sentences.copy(), model=demo, n_genes=N_GENES, client="tcp://127.0.0.1:8786")
    closed = distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0")
    closed.close()
    with pytest.raises(ValueError, match=r"The Dask client is closed; start a new one"):
        sc_c2s.tl.embed(sentences.copy(), model=demo, n_genes=N_GENES, client=closed)
    with pytest.raises(ValueError, match=r"The Dask client is closed"):
        sc_c2s.tl.generate(sentences, model=demo, cell_types={"CD19+ B": 2}, client=closed)
    with pytest.raises(ValueError, match=r"The Dask client is closed"):  # was not looked at
        sc_c2s.tl.generate(sentences, model=demo, tissues={"blood": 2}, cells_per_sample=2, client=closed)


def test_warnings_of_several_tasks_name_their_cells():
    """Tasks' warnings that counted their own cells were merged when their texts agreed, losing the counts."""
    empty, genes = (UserWarning, "1 of 13 answers are empty"), (UserWarning, "2 answers are lists of genes")
    offsets = np.array([0, 13, 26, 39])
    with pytest.warns(UserWarning) as record:
        _dask._warn_again([[empty], [empty, genes, empty], []], offsets, n_cells=39)
    assert [str(w.message) for w in record] == [
        "In cells 0–12, 13–25 of 39 (one Dask task each): 1 of 13 answers are empty",
        "In cells 13–25 of 39 (one Dask task each): 2 answers are lists of genes",
    ]
    with pytest.warns(UserWarning) as record:
        _dask._warn_again([[empty]], offsets[:2], n_cells=13)
    assert [str(w.message) for w in record] == ["1 of 13 answers are empty"]
    with pytest.warns(UserWarning) as record:  # one every task gave is about the call, not some of its cells
        _dask._warn_again([[empty], [empty], [empty]], offsets, n_cells=39)
    assert [str(w.message) for w in record] == ["1 of 13 answers are empty"]


def test_labels_given_as_an_iterator_reach_the_tasks(sentences, expected, demo):
    """The check spent the iterator, and the tasks refused the rest as "an empty list"."""
    adata = lazy_genes(sentences, chunks=40)
    sc_c2s.tl.annotate(adata, model=demo, labels=iter(demo.metadata.labels), n_genes=N_GENES)
    pd.testing.assert_series_equal(adata.obs["c2s_cell_type"], expected.obs["c2s_cell_type"])


def test_warnings_the_verb_logs_reach_the_session_once(sentences, demo, scanpy_log):
    """Warnings logged through scanpy stayed in each task's log (a worker's, which a notebook does not show)."""
    adata = lazy_genes(sentences[:40], chunks=10)
    sc_c2s.tl.annotate(adata, model=demo, labels="model", n_genes=2 * N_GENES)
    log = scanpy_log.getvalue()
    assert log.count(f"The sentences were ranked with `n_genes={N_GENES}`, fewer than the {2 * N_GENES}") == 1


def test_warnings_of_tasks_running_at_once_stay_with_their_task():
    """Two threads of a worker: the first task ends while the second still runs (once in CI, the second's were lost).

    With `warnings.catch_warnings` per task, the first task's warning went to the second's record and the second's,
    raised after the first task restored the filters, to no one.
    """
    filters, showwarning = list(warnings.filters), warnings.showwarning
    second_started, first_ended = threading.Event(), threading.Event()

    def first() -> list[str]:
        with _dask._TASK_WARNINGS.record() as caught:
            assert second_started.wait(timeout=10)
            warnings.warn("first", UserWarning, stacklevel=1)
        first_ended.set()
        return [str(w.message) for w in caught]

    def second() -> list[str]:
        with _dask._TASK_WARNINGS.record() as caught:
            second_started.set()
            assert first_ended.wait(timeout=10)
            for _ in range(2):  # from one place: recorded each time, as the verb raised it again in another task
                warnings.warn("second", UserWarning, stacklevel=1)
        return [str(w.message) for w in caught]

    with ThreadPoolExecutor(2) as pool:
        first_task, second_task = pool.submit(first), pool.submit(second)
        assert first_task.result() == ["first"]
        assert second_task.result() == ["second", "second"]
    assert warnings.filters == filters
    assert warnings.showwarning is showwarning


# ---- which model the tasks use --------------------------------------------------------------------------------------


@pytest.fixture
def fresh_worker(monkeypatch):
    """This process as a Dask worker that has loaded nothing and was given no model."""
    monkeypatch.setattr(_dask, "_MODELS", {})
    monkeypatch.setattr(_dask, "_GIVEN", type(_dask._GIVEN)())
    monkeypatch.setattr(_dask, "LOADS", Counter())


def lazy_genes(adata: ad.AnnData, chunks) -> ad.AnnData:
    out = adata.copy()
    out.obsm["c2s_genes"] = da.from_array(adata.obsm["c2s_genes"], chunks=(chunks, -1))
    return out


def halve_the_weights(directory: Path) -> None:
    """Save the model of `directory` into it again with its weights halved, as new training there would."""
    changed = sc_c2s.models.load(directory)
    with torch.no_grad():
        for weights in changed.model.parameters():
            weights.mul_(0.5)
    changed.save(directory)


@pytest.mark.usefixtures("fresh_worker")
def test_a_resaved_model_is_the_one_used(sentences, tmp_path):
    """Tasks used the first model loaded from a directory, also after new weights were saved there and loaded."""
    directory = sc_c2s.models.load("demo").save(tmp_path / "model")
    first = sc_c2s.models.load(directory)
    data = sentences[:20]
    sc_c2s.tl.embed(lazy_genes(data, 10), model=first, n_genes=N_GENES)
    halve_the_weights(directory)
    latest = sc_c2s.models.load(directory)
    in_memory, chunked = data.copy(), lazy_genes(data, 10)
    sc_c2s.tl.embed(in_memory, model=latest, n_genes=N_GENES)
    sc_c2s.tl.embed(chunked, model=latest, n_genes=N_GENES)
    np.testing.assert_allclose(chunked.obsm["X_c2s"], in_memory.obsm["X_c2s"], **FLOAT32_OUTPUTS)

    sent_latest, sent_first = (_dask.reference(m, device=None) for m in (latest, first))
    _dask._GIVEN.clear()  # as on a worker: it loads from the files, and refuses those that are not the model's
    assert _dask.worker_model(sent_latest).sha256 == latest.sha256
    with pytest.raises(ValueError, match=r"changed after the model passed was loaded from them \(model.safetensors"):
        _dask.worker_model(sent_first)


@pytest.mark.usefixtures("fresh_worker")
def test_a_directory_given_by_its_path_is_read_as_it_is_now(sentences, tmp_path):
    """Tasks kept the model loaded from a directory given by its path, also after new weights were saved there (say,
    by `finetune` into the same `output_dir`): the old weights' results, without a word."""
    directory = sc_c2s.models.load("demo").save(tmp_path / "model")
    data = sentences[:20]
    sc_c2s.tl.embed(lazy_genes(data, 10), model=directory, n_genes=N_GENES)
    halve_the_weights(directory)
    in_memory, chunked = data.copy(), lazy_genes(data, 10)
    sc_c2s.tl.embed(in_memory, model=directory, n_genes=N_GENES)
    sc_c2s.tl.embed(chunked, model=directory, n_genes=N_GENES)
    np.testing.assert_allclose(chunked.obsm["X_c2s"], in_memory.obsm["X_c2s"], **FLOAT32_OUTPUTS)
    assert sorted(_dask.LOADS.values()) == [1, 1]  # once before the weights changed, once after


@pytest.mark.usefixtures("fresh_worker")
def test_a_worker_holds_one_model_and_its_threads_load_it_once(demo, monkeypatch):
    """Threads of a worker each loaded the model; every checkpoint and dtype stayed loaded for good."""
    calls = []

    def slow_load(*args, **kwargs):
        calls.append(args)
        time.sleep(0.2)  # the second thread asks meanwhile
        return demo

    monkeypatch.setattr(sc_c2s.models, "load", slow_load)
    by_name = _dask.reference("demo", device=None)
    with ThreadPoolExecutor(2) as pool:
        models = list(pool.map(_dask.worker_model, [by_name, by_name]))
    assert models == [demo, demo]
    assert len(calls) == 1
    loaded, on_cpu = _dask.reference(demo, device=None), _dask.reference(demo, device="cpu")
    _dask._GIVEN.clear()  # as on a worker
    assert _dask.worker_model(loaded) is demo  # "demo" by name, in the default dtype, serves the loaded demo
    assert _dask.worker_model(on_cpu) is demo  # another reference: loaded in place of the first
    assert len(calls) == 2
    assert len(_dask._MODELS) == 1


@pytest.mark.usefixtures("fresh_worker")
def test_a_model_given_is_not_kept():
    model = sc_c2s.models.load("demo")
    _dask.reference(model, device=None)
    weights = weakref.ref(model.model)
    del model
    gc.collect()
    assert weights() is None


def test_a_relative_path_is_sent_absolute(tmp_path, monkeypatch):
    sc_c2s.models.load("demo").save(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    model = sc_c2s.models.load("model")
    assert _dask.reference(model, device=None).name_or_path == str(tmp_path / "model")
    assert _dask.reference("model", device=None).name_or_path == str(tmp_path / "model")


@pytest.mark.usefixtures("fresh_worker")
def test_a_model_without_file_hashes_loads_once(tmp_path):
    """A model built in memory (no hashes of files) was never recognised again: loaded for every task."""
    sc_c2s.models.load("demo").save(tmp_path / "model")
    model = dataclasses.replace(sc_c2s.models.load(tmp_path / "model"), sha256={})
    ref = _dask.reference(model, device=None)
    _dask._GIVEN.clear()  # as on a worker
    for _ in range(3):
        _dask.worker_model(ref)
    assert _dask.LOADS[ref] == 1


def test_prompts_compute_only_the_genes_asked_for(sentences):
    """Prompts of 5 genes from a lazy obsm computed all its columns (all expressed genes with n_genes=None)."""
    genes = sentences.obsm["c2s_genes"]

    def only_the_first_chunk(block, block_info=None):
        if block_info[0]["chunk-location"][1] > 0:
            msg = "computed a column that no prompt reads"
            raise AssertionError(msg)
        return block

    lazy = sentences.copy()
    lazy.obsm["c2s_genes"] = da.from_array(genes, chunks=(50, 5)).map_blocks(only_the_first_chunk, dtype=genes.dtype)
    words = sc_c2s.prompts.sentence_words(lazy, n_genes=5)
    assert words == sc_c2s.prompts.sentence_words(sentences, n_genes=5)


def test_empty_chunks_are_skipped(sentences, expected, demo):
    """embed raised a bare IndexError on a chunk of no cells."""
    adata = sentences.copy()
    adata.obsm["c2s_genes"] = da.from_array(sentences.obsm["c2s_genes"], chunks=((50, 0, 50), -1))
    sc_c2s.tl.embed(adata, model=demo, n_genes=N_GENES)
    np.testing.assert_allclose(adata.obsm["X_c2s"], expected.obsm["X_c2s"], **FLOAT32_OUTPUTS)


def test_generate_over_dask_chunks_without_a_cluster_equals_in_memory(sentences, demo):
    """Cells split over four chunks (3 + 3 + 3 + 1) give the cells of one run: chunk k starts at its first cell."""
    adata = sentences.copy()
    adata.obsm["c2s_genes"] = da.from_array(sentences.obsm["c2s_genes"], chunks=(64, -1))
    request = {"model": demo, "cell_types": {"CD14+ Monocyte": 5, "CD19+ B": 5}, "n_genes": 10}
    over_dask = sc_c2s.tl.generate(adata, **request)
    in_memory = sc_c2s.tl.generate(sentences, **request)
    pd.testing.assert_frame_equal(over_dask.obs, in_memory.obs)
    assert (over_dask.X != in_memory.X).nnz == 0
    # cells of one type, in different chunks, differ
    assert over_dask.obs["c2s_sentence"].iloc[:5].nunique() == 5
