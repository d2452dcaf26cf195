"""The sdist and wheel build, carry the package with its data and nothing else, and install into a fresh venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "sc_c2s"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """Build the sdist, then the wheel from the sdist, as ``python -m build`` does by default."""
    out = tmp_path_factory.mktemp("dist")
    # no isolation: the build backend comes from the test extras instead of the internet
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def package_files() -> set[str]:
    """Files of the source package, as paths inside a wheel."""
    return {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_names_and_version(dist):
    v = version("sc-c2s")
    assert dist["sdist"].name == f"sc_c2s-{v}.tar.gz"
    assert dist["wheel"].name == f"sc_c2s-{v}-py3-none-any.whl"


def test_wheel_holds_the_package_and_nothing_else(dist):
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    metadata = {n for n in names if n.startswith("sc_c2s-")}
    assert names - metadata == package_files()
    assert {n.split("/", 1)[1] for n in metadata} >= {"METADATA", "WHEEL", "RECORD", "licenses/LICENSE"}
    demo = {n for n in names if n.startswith("sc_c2s/models/demo/")}
    assert {n.rsplit("/", 1)[1] for n in demo} >= {"c2s_metadata.json", "config.json", "tokenizer.json"}
    assert any(n.endswith(".safetensors") for n in demo)


def test_sdist_holds_sources_tests_and_docs(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {f"src/{f}" for f in package_files()} <= names
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "docs/conf.py", "recipe/meta.yaml"} <= names
    assert any(n.startswith("tests/test_") for n in names)
    assert not any(n.startswith(("docs/_build/", "docs/generated/", ".ci/")) or "__pycache__" in n for n in names)


def test_twine_check_strict(dist):
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(dist["sdist"]), str(dist["wheel"])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_wheel_runs_the_demo_in_a_fresh_venv(dist, tmp_path):
    """Install the wheel (with the torch build of this environment) into a new venv and run ``sc-c2s demo``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_ = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_ / "python"
    try:
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={version('torch')}", str(dist["wheel"])], check=True)
        subprocess.run([str(python), "-m", "pip", "check"], check=True)
        where = subprocess.run(
            [str(python), "-c", "import sc_c2s; print(sc_c2s.__file__)"], check=True, capture_output=True, text=True
        )
        assert Path(where.stdout.strip()).is_relative_to(venv), "imported sc_c2s from outside the venv"
        # few generated cells per type keep this within CI time; every step of the demo still runs
        demo = subprocess.run(
            [str(bin_ / "sc-c2s"), "demo", "--n-cells", "3"], cwd=tmp_path, capture_output=True, text=True
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        out = tmp_path / "sc_c2s_demo"
        written = {p.name for p in out.iterdir()}
        assert written >= {"rank_fit.png", "generation.png", "pbmc68k_c2s.h5ad", "generated.h5ad", "report.txt"}
        assert "Annotation with the model's" in (out / "report.txt").read_text()
    finally:
        shutil.rmtree(venv)


def test_import_leaves_heavy_and_optional_dependencies_unloaded():
    """`import sc_c2s` stays light: the model stack and the download and cluster libraries load when a verb needs
    them (pooch and its dependencies once took a fifth of the import time). Only what sc_c2s adds to `import scanpy`
    counts: anndata itself imports dask, and anndata 0.11 torch, where they are installed."""
    heavy = ["torch", "transformers", "peft", "bitsandbytes", "pooch", "requests", "dask", "distributed"]
    code = (
        "import sys, scanpy; before = set(sys.modules); import sc_c2s\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules and m not in before))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == []
