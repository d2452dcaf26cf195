from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import mudata as md
import pytest
import scanpy as sc

DATA = Path(__file__).parent / "data"


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
