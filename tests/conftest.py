from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pytest
import scanpy as sc

DATA = Path(__file__).parent / "data"
#: Longest sentence of the `short_sentences` cells.
SHORT_SENTENCE_GENES = 12


@pytest.fixture(scope="session")
def _cellbench() -> ad.AnnData:
    return ad.read_h5ad(DATA / "cellbench_300.h5ad")


@pytest.fixture(scope="session")
def _pbmc4k() -> ad.AnnData:
    return ad.read_h5ad(DATA / "pbmc4k_500.h5ad")


@pytest.fixture(scope="session")
def _pbmc68k() -> ad.AnnData:
    return sc.datasets.pbmc68k_reduced()


@pytest.fixture
def cellbench(_cellbench) -> ad.AnnData:
    """300 CellBench cells × 2,000 genes: raw counts (CSR float32), `cell_type`, `batch`, `var['gene_symbol']`."""
    return _cellbench.copy()


@pytest.fixture
def pbmc4k(_pbmc4k) -> ad.AnnData:
    """500 PBMC 4k cells × 2,000 genes: raw counts (CSR float32), `cluster`, placeholder gene names."""
    return _pbmc4k.copy()


@pytest.fixture
def pbmc68k(_pbmc68k) -> ad.AnnData:
    """scanpy's 700 PBMCs × 765 genes: scaled `X`, log-normalised `.raw`, `bulk_labels`."""
    return _pbmc68k.copy()


@dataclass
class Container:
    """Puts an AnnData into the container under test and gets the modality back out."""

    is_mudata: bool

    def wrap(self, adata: ad.AnnData) -> ad.AnnData | md.MuData:
        """The AnnData itself, or a MuData whose ``"rna"`` modality it is."""
        if not self.is_mudata:
            return adata
        with md.set_options(pull_on_update=False):
            return md.MuData({"rna": adata})

    def rna(self, data: ad.AnnData | md.MuData) -> ad.AnnData:
        """The AnnData that holds the results."""
        return data.mod["rna"] if self.is_mudata else data


@pytest.fixture(params=[False, True], ids=["AnnData", "MuData"])
def container(request) -> Container:
    """Run a test on AnnData and on MuData."""
    return Container(request.param)


@pytest.fixture
def scanpy_log():
    """A stream receiving what scanpy logs during the test, including the `deep` details of `finished`."""
    stream = io.StringIO()
    logfile, verbosity = sc.settings.logfile, sc.settings.verbosity
    sc.settings.logfile, sc.settings.verbosity = stream, "hint"
    yield stream
    sc.settings.logfile, sc.settings.verbosity = logfile, verbosity


@pytest.fixture
def n_jobs():
    """Restore `scanpy.settings.n_jobs` after a test that changes it."""
    previous = sc.settings.n_jobs
    yield
    sc.settings.n_jobs = previous


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread, and then do not fight over the cores of a shared runner."""
    import torch

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="session")
def _short_sentences(_cellbench) -> ad.AnnData:
    import sc_c2s

    adata = _cellbench[::8].copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol", n_genes=SHORT_SENTENCE_GENES, rank_fit=False)
    genes = adata.obsm["c2s_genes"]
    for i, n in enumerate(3 + np.arange(adata.n_obs) % 10):
        genes[i, n:] = -1
    return adata


@pytest.fixture
def short_sentences(_short_sentences) -> ad.AnnData:
    """38 CellBench cells whose sentences have 3 to 12 genes, so that batches mix prompt lengths."""
    return _short_sentences.copy()
