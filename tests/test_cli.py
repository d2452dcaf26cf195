"""The sc-c2s command: end to end in a subprocess, and its exit codes."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import anndata as ad
import numpy as np
import pooch
import pytest
import scanpy as sc
import torch

import sc_c2s
from sc_c2s import cli
from sc_c2s.models import C2SMetadata, _download, _memory
from sc_c2s.models._scratch import build_model, build_tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, _cellbench) -> Path:
    """A tiny random checkpoint over the CellBench gene symbols and cell lines, with a vocabulary and rank fit."""
    adata = _cellbench.copy()
    sc_c2s.pp.to_sentences(adata, gene_symbols="gene_symbol")
    words = [w.upper() for w in adata.uns["c2s"]["genes"]]
    labels = sorted(adata.obs["cell_type"].unique())
    tokenizer = build_tokenizer(words, labels, max_genes=20)
    path = tmp_path_factory.mktemp("tiny-cli")
    build_model(tokenizer, hidden_size=16, n_layers=1, n_heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    C2SMetadata(
        name="tiny-cli", labels=labels, vocabulary=words, rank_fit=adata.uns["c2s"]["rank_fit"], n_genes=20
    ).write(path)
    return path


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of a subprocess: an empty model cache, no GPU, quiet threads."""
    return {
        **os.environ,
        _download.CACHE_ENV: str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def sc_c2s_command(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sc_c2s", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def test_console_script_is_declared():
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "sc-c2s"]
    assert entry.value == "sc_c2s.cli:main"


@pytest.mark.slow  # minutes on two CPU cores: it annotates all 700 cells
def test_demo_writes_its_files(tmp_path, env):
    out = tmp_path / "demo"
    result = sc_c2s_command("demo", "--out", out, "--n-cells", "3", env=env)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {
        "pbmc68k_c2s.h5ad",
        "generated.h5ad",
        "generation_scores.csv",
        "rank_fit.png",
        "generation.png",
        "report.txt",
    }
    for step in range(1, 7):
        assert f"[{step}/6]" in result.stderr
    real = ad.read_h5ad(out / "pbmc68k_c2s.h5ad")
    generated = ad.read_h5ad(out / "generated.h5ad")
    assert {"c2s_sentence", "c2s_cell_type", "c2s_cell_type_score"} <= set(real.obs.columns)
    assert generated.var_names.equals(real.var_names)
    assert generated.obs["cell_type"].value_counts().eq(3).all()
    report = (out / "report.txt").read_text(encoding="utf-8")
    assert report.isascii()  # printed too: a redirected stdout on Windows encodes it in the locale's code page
    assert "Rank -> expression fit" in report
    assert "knn_recovery" in report
    assert report in result.stdout
    assert (out / "rank_fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def small_file(tmp_path, cellbench) -> Path:
    """40 CellBench cells in an .h5ad file."""
    path = tmp_path / "cells.h5ad"
    cellbench[::10].copy().write_h5ad(path)
    return path


def test_generate_in_a_subprocess(tmp_path, env, checkpoint, small_file):
    out = tmp_path / "generated.h5ad"
    result = sc_c2s_command(
        "generate", "--model", checkpoint, "--cell-types", "A549=3", "H838", "A549=1", "--n-genes", "10",
        "--data", small_file, "--gene-symbols", "gene_symbol", "--seed", "7", "--out", out, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "generating 5 cells" in result.stderr
    generated = ad.read_h5ad(out)
    assert generated.obs["cell_type"].tolist() == ["A549"] * 4 + ["H838"]
    assert generated.var_names.equals(ad.read_h5ad(small_file).var_names)
    params = generated.uns["c2s_generate"]["params"]
    assert params["random_state"] == 7
    assert params["n_genes"] == 10


def test_generate_without_data_uses_the_checkpoint(tmp_path, checkpoint):
    out = tmp_path / "generated.h5ad"
    argv = ["-q", "generate", "--model", str(checkpoint), "--cell-types", "H2228=2", "--n-genes", "10"]
    assert cli.main([*argv, "--out", str(out)]) == cli.EXIT_OK
    generated = ad.read_h5ad(out)
    assert generated.n_obs == 2
    assert generated.var_names.tolist() == C2SMetadata.read(checkpoint).vocabulary
    # exact length by default: 10 words, genes unless the random model picks a template word
    words = generated.obs[["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]].sum(axis=1)
    assert words.tolist() == [10, 10]


def test_generate_sampling_switches(tmp_path, checkpoint):
    out = tmp_path / "generated.h5ad"
    argv = ["-q", "generate", "--model", str(checkpoint), "--cell-types", "H2228=2", "--n-genes", "10"]
    argv += ["--allow-repeats", "--any-length"]
    assert cli.main([*argv, "--out", str(out)]) == cli.EXIT_OK
    params = ad.read_h5ad(out).uns["c2s_generate"]["params"]
    assert not params["unique_genes"]
    assert not params["exact_length"]


def test_annotate(tmp_path, checkpoint, small_file):
    out = tmp_path / "annotated.h5ad"
    argv = ["-q", "annotate", str(small_file), "--model", str(checkpoint), "--labels", "model", "--n-genes", "10"]
    assert cli.main([*argv, "--gene-symbols", "gene_symbol", "--rerank", "2", "--out", str(out)]) == cli.EXIT_OK
    cells = ad.read_h5ad(out)
    assert set(cells.obs["c2s_cell_type"]) <= set(cells.obs["cell_type"])
    assert np.all((cells.obs["c2s_cell_type_score"] > 0) & (cells.obs["c2s_cell_type_score"] <= 1))
    assert cells.uns["c2s"]["params"]["gene_symbols"] == "gene_symbol"
    assert cells.uns["c2s_cell_type"]["params"]["rerank"] == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--labels", "model", "--rerank", "-1"], "--rerank must be a whole number of labels, or 0 for no re-ranking"),
        (["--rerank", "2"], "--rerank re-ranks the candidate labels of --labels; pass --labels"),
    ],
)
def test_rerank_is_checked_before_reading(tmp_path, small_file, nothing_read, capsys, options, message):
    argv = ["-q", "annotate", str(small_file), "--model", "demo", "--out", str(tmp_path / "out.h5ad")]
    assert cli.main([*argv, *options]) == cli.EXIT_USAGE
    assert f"sc-c2s: error: {message}" in capsys.readouterr().err


def test_models_list(capsys):
    assert cli.main(["models", "list"]) == cli.EXIT_OK
    listing = capsys.readouterr().out
    assert "C2S-Pythia-410m-cell-type-prediction" in listing
    assert "demo" in listing


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["annotate", "missing.h5ad", "--model", "demo", "--out", "x.h5ad"], cli.EXIT_MISSING, "No such file"),
        (["generate", "--model", "./no/such/dir", "--cell-types", "B", "--out", "x.h5ad"], cli.EXIT_MISSING, "not a"),
        (["generate", "--model", "nope", "--cell-types", "B", "--out", "x.h5ad"], cli.EXIT_UNKNOWN_MODEL, "demo"),
        (["models", "fetch", "nope"], cli.EXIT_UNKNOWN_MODEL, "No model called 'nope'"),
        (["generate", "--model", "demo", "--cell-types", "B=two", "--out", "x.h5ad"], cli.EXIT_USAGE, "TYPE=N"),
    ],
)
def test_exit_codes(tmp_path, monkeypatch, capsys, argv, code, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()


def test_unknown_cell_type_is_bad_input(tmp_path, checkpoint, capsys):
    argv = ["generate", "--model", str(checkpoint), "--cell-types", "T cell", "--out", str(tmp_path / "x.h5ad")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "does not know the cell types ['T cell']" in capsys.readouterr().err


def test_no_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(_download.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(_download.BASE_URL_ENV, "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(_download, "RETRIES", 0)
    assert cli.main(["-q", "models", "fetch", "pythia-160m-c2s"]) == cli.EXIT_NO_NETWORK
    assert "Could not download" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", "demo"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "--cell-types" in capsys.readouterr().err


def test_cell_types_parsing():
    assert cli._cell_types(["B cell=3", "NK", "B cell=2", "CD4+ T=1"]) == {"B cell": 5, "NK": 1, "CD4+ T": 1}
    assert cli._cell_types(["B cell=0", "NK=2"]) == {"B cell": 0, "NK": 2}
    with pytest.raises(ValueError, match=r"with N a number of cells \(0, 1, 2, \.\.\.\), got 'B=-1'"):
        cli._cell_types(["B=-1"])  # "a whole number N" read wrong: -1 is one
    with pytest.raises(ValueError, match="TYPE=N"):
        cli._cell_types(["=3"])


def test_no_cells_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """--cell-types 'B cell=0' was refused by the Python API after the model had loaded, with Python syntax."""
    monkeypatch.setattr(cli, "_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    argv = ["-q", "generate", "--model", "demo", "--cell-types", "CD19+ B=0", "NK=0", "--out", str(tmp_path / "x.h5ad")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "sc-c2s: error: --cell-types 'CD19+ B=0' NK=0 asks for no cells; give a TYPE=N an N of 1 or more (TYPE alone "
        "is 1 cell).\n"
    )


@pytest.fixture
def broken_checkpoint(tmp_path, checkpoint) -> Path:
    path = tmp_path / "broken-model"
    shutil.copytree(checkpoint, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return path


@pytest.fixture
def user_errors(tmp_path, small_file, broken_checkpoint) -> dict[str, tuple[list[str], int, str]]:
    """Command lines with a user mistake: argv, the exit status and what the one line of stderr says."""
    (tmp_path / "notes.txt").write_text("not a folder")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "text.h5ad").write_text("not hdf5")
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(small_file.read_bytes()[:3000])
    annotate = ["-q", "annotate", "--model", "demo", "--gene-symbols", "gene_symbol"]
    out = ["--out", str(tmp_path / "out.h5ad")]
    return {
        "missing input": ([*annotate, str(tmp_path / "missing.h5ad"), *out], cli.EXIT_MISSING, "No such file"),
        "input is a folder": ([*annotate, str(tmp_path), *out], cli.EXIT_USAGE, "is a folder"),
        "csv input": ([*annotate, str(tmp_path / "table.csv"), *out], cli.EXIT_USAGE, "Cannot read"),
        "text named .h5ad": ([*annotate, str(tmp_path / "text.h5ad"), *out], cli.EXIT_USAGE, "Cannot read"),
        "truncated h5ad": ([*annotate, str(truncated), *out], cli.EXIT_USAGE, "Cannot read"),
        "broken checkpoint": (
            ["-q", "generate", "--model", str(broken_checkpoint), "--cell-types", "A549", *out],
            cli.EXIT_USAGE,
            "model.safetensors of the checkpoint at",
        ),
        "cuda without cuda": (
            ["-q", "generate", "--model", "demo", "--cell-types", "CD19+ B", "--device", "cuda", *out],
            cli.EXIT_USAGE,
            "no CUDA device is available",
        ),
        "out under a file": (
            [*annotate, str(small_file), "--out", str(tmp_path / "notes.txt" / "out.h5ad")],
            cli.EXIT_USAGE,
            "is a file, not a folder",
        ),
        "out is a folder": ([*annotate, str(small_file), "--out", str(tmp_path)], cli.EXIT_USAGE, "it is a folder"),
        "out of the other kind": (
            ["-q", "generate", "--model", "demo", "--cell-types", "CD19+ B", "--out", str(tmp_path / "x.h5mu")],
            cli.EXIT_USAGE,
            "the result is an AnnData; name an .h5ad file",
        ),
        "demo out is a file": (["-q", "demo", "--out", str(small_file)], cli.EXIT_USAGE, "it is a file, not a folder"),
        "no cells": (
            ["-q", "generate", "--model", "demo", "--cell-types", "CD19+ B=0", *out],
            cli.EXIT_USAGE,
            "asks for no cells",
        ),
        "bad batch size": (
            ["-q", "generate", "--model", "demo", "--cell-types", "CD19+ B", "--batch-size", "0", *out],
            cli.EXIT_USAGE,
            "--batch-size must be a positive integer",
        ),
    }


USER_ERRORS = [
    "missing input",
    "input is a folder",
    "csv input",
    "text named .h5ad",
    "truncated h5ad",
    "broken checkpoint",
    "cuda without cuda",
    "out under a file",
    "out is a folder",
    "out of the other kind",
    "demo out is a file",
    "no cells",
    "bad batch size",
]


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_errors_print_one_line(user_errors, case, capsys, monkeypatch):
    """These used to print tracebacks: a non-h5ad or truncated input, a broken checkpoint, --device cuda without
    CUDA, an --out path under a file."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv, code, message = user_errors[case]
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("sc-c2s: error: ")
    assert message in err
    assert not Path(argv[argv.index("--out") + 1]).is_file() or case == "demo out is a file"


@pytest.mark.parametrize("case", ["text named .h5ad", "cuda without cuda"])  # before and after loading torch
def test_user_errors_in_a_subprocess(user_errors, case, env, tmp_path):
    argv, code, message = user_errors[case]
    env["PYTHONPATH"] = os.pathsep.join([str(Path(sc_c2s.__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "sc_c2s", *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert result.returncode == code
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("sc-c2s: error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bug_still_shows_its_traceback(tmp_path, small_file, monkeypatch):
    monkeypatch.setattr(cli, "_sentences", lambda data, args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["-q", "annotate", str(small_file), "--model", "demo", "--out", str(tmp_path / "out.h5ad")])


def test_quiet_prints_nothing_on_success(tmp_path, checkpoint, capsys):
    out = tmp_path / "generated.h5ad"
    argv = ["-q", "generate", "--model", str(checkpoint), "--cell-types", "H2228=1", "--n-genes", "3"]
    assert cli.main([*argv, "--out", str(out)]) == cli.EXIT_OK
    assert capsys.readouterr().err == ""
    assert out.is_file()


def test_a_model_too_big_is_a_user_error(tmp_path, monkeypatch, capsys):
    """models.load raises MemoryError before downloading a model the device cannot hold: one line, not a traceback."""
    monkeypatch.delenv("SC_C2S_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(_memory, "capacity", lambda device: 2**20)  # 1 MiB free
    argv = ["-q", "generate", "--model", "demo", "--cell-types", "CD19+ B", "--out", str(tmp_path / "x.h5ad")]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("sc-c2s: error: ")
    assert "needs at least" in err


def test_a_failed_write_keeps_the_earlier_output(tmp_path, checkpoint, monkeypatch, capsys):
    """Outputs were written in place: a full disk left a half-written file over an earlier good result."""
    out = tmp_path / "generated.h5ad"
    argv = ["-q", "generate", "--model", str(checkpoint), "--cell-types", "H2228=1", "--n-genes", "3"]
    argv += ["--out", str(out)]
    assert cli.main(argv) == cli.EXIT_OK
    before = out.read_bytes()

    def disk_full(self, filename, **kwargs):
        Path(filename).write_bytes(b"\x89HDF\r\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", disk_full)
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.fixture
def nothing_read(monkeypatch):
    """Make reading an input (or the demo's data) a test failure: the commands must refuse before."""

    def read(*args, **kwargs):
        raise AssertionError("read before the command line was checked")

    monkeypatch.setattr(cli, "_read", read)
    monkeypatch.setattr(sc.datasets, "pbmc68k_reduced", read)


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        (["--n-genes", "0"], cli.EXIT_USAGE, "--n-genes"),
        (["--batch-size", "0"], cli.EXIT_USAGE, "--batch-size"),
        (["--device", "nosuch"], cli.EXIT_USAGE, "is not a torch device"),
        (["--model", "nope"], cli.EXIT_UNKNOWN_MODEL, "No model called 'nope'"),
        (["--model", "no/such/dir"], cli.EXIT_MISSING, "is not a checkpoint directory"),
    ],
)
@pytest.mark.parametrize("command", ["annotate", "generate"])
def test_arguments_are_checked_before_reading(
    tmp_path, small_file, nothing_read, capsys, command, options, code, message
):
    """They were checked after the input was read and ranked."""
    argv = ["-q", "annotate", str(small_file)] if command == "annotate" else ["-q", "generate", "--cell-types", "B"]
    argv += ["--model", "demo", "--out", str(tmp_path / "out.h5ad")]
    argv += [] if command == "annotate" else ["--data", str(small_file)]
    assert cli.main([*argv, *options]) == code
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["annotate", "generate"])
def test_a_file_for_the_model_is_bad_input(tmp_path, small_file, nothing_read, capsys, command):
    """An existing file exited 3, the status of a path that does not exist, while an empty folder exited 2."""
    argv = ["-q", "annotate", str(small_file)] if command == "annotate" else ["-q", "generate", "--cell-types", "B"]
    assert cli.main([*argv, "--model", str(small_file), "--out", str(tmp_path / "out.h5ad")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        f"sc-c2s: error: {str(small_file)!r} is a file, not a checkpoint directory; pass the folder that holds the "
        "model's config.json and weights, or a name from 'sc-c2s models list'.\n"
    )


@pytest.mark.parametrize("option", ["--temperature", "--seed"])
def test_sampling_is_checked_before_reading(tmp_path, small_file, nothing_read, capsys, option):
    argv = ["-q", "generate", "--model", "demo", "--cell-types", "B", "--data", str(small_file)]
    assert cli.main([*argv, option, "-1", "--out", str(tmp_path / "out.h5ad")]) == cli.EXIT_USAGE
    assert f"{option} must be" in capsys.readouterr().err


def test_an_unwritable_output_folder_is_refused_first(tmp_path, small_file, nothing_read, monkeypatch, capsys):
    """A folder that may not be written to was found out at the end, after the model had run."""
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))
    argv = ["-q", "annotate", str(small_file), "--model", "demo", "--out", str(locked / "new" / "out.h5ad")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "may not write into the folder" in capsys.readouterr().err


def test_demo_into_an_existing_unwritable_folder_is_refused_first(tmp_path, nothing_read, monkeypatch, capsys):
    """An existing --out folder was never checked, only the folder above it: the demo failed with a traceback after
    its work."""
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))
    assert cli.main(["-q", "demo", "--out", str(locked)]) == cli.EXIT_USAGE
    assert f"you may not write into the folder {str(locked)!r}" in capsys.readouterr().err


def test_a_write_that_fails_is_a_user_error_that_keeps_the_old_file(tmp_path):
    """The demo's plots, scores and report were written without the care of its .h5ad files: a folder in the way
    (or a full disk) ended in a traceback."""
    in_the_way = tmp_path / "rank_fit.png"
    in_the_way.mkdir()
    with pytest.raises(ValueError, match=rf"^Cannot write {re.escape(repr(str(in_the_way)))}: .*Is a directory"):
        with cli._writing(in_the_way) as partial:
            partial.write_text("plot")
    report = tmp_path / "report.txt"
    report.write_text("old")
    with pytest.raises(ValueError, match=r"^Cannot write .*report\.txt'"):
        with cli._writing(report) as partial:
            partial.write_text("new, cut short")
            raise OSError(28, "No space left on device")
    assert report.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_fit.png", "report.txt"]


def test_a_missing_optional_package_is_one_line_with_its_own_status(tmp_path, small_file, monkeypatch, capsys):
    """A Gemma checkpoint without sentencepiece, or an adapter without peft, ended in a traceback and status 1, "a
    bug"."""
    from sc_c2s._utils._optional import import_optional

    def load(*args, **kwargs):
        import_optional("no_such_package", extra="gemma", purpose="Reading a SentencePiece tokenizer.model")

    monkeypatch.setattr(cli, "_model", load)
    argv = ["annotate", str(small_file), "--model", "demo", "--out", str(tmp_path / "out.h5ad")]
    assert cli.main(argv) == cli.EXIT_MISSING_PACKAGE
    assert capsys.readouterr().err.endswith(
        "sc-c2s: error: Reading a SentencePiece tokenizer.model needs the `no_such_package` package: "
        '`pip install "sc-c2s[gemma]"`.\n'
    )


def test_a_cache_that_cannot_hold_the_download_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError (a cache folder that is a file) ended in a traceback and status 1, "a bug"."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(_download.CACHE_ENV, str(tmp_path / "a_file"))
    assert cli.main(["models", "fetch", "C2S-Pythia-410m-cell-type-prediction"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("sc-c2s: error: Cannot make the folder for the download of C2S-Pythia-410m-cell-type-")
    assert "Point $SC_C2S_CACHE at a folder you can write to" in err


def test_model_among_other_labels_is_refused(tmp_path, small_file, nothing_read, capsys):
    """`--labels model "CD19+ B"` annotated cells as a cell type called "model"."""
    argv = ["-q", "annotate", str(small_file), "--model", "demo", "--out", str(tmp_path / "out.h5ad")]
    assert cli.main([*argv, "--labels", "model", "CD19+ B"]) == cli.EXIT_USAGE
    assert "--labels model stands for the model's label set, alone" in capsys.readouterr().err


def test_a_reader_that_leaves_is_no_network_failure(env):
    """`sc-c2s models list | head -1` exited 5, "no network", with "[Errno 32] Broken pipe" on stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sc_c2s", "models", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.stdout.close()  # before the command writes: it takes a second to start
    assert process.wait(timeout=600) == cli.EXIT_BROKEN_PIPE
    assert process.stderr.read() == b""
    process.stderr.close()


@pytest.mark.parametrize("options", [["--n-cells", "0"], ["--n-cells", "-1"], ["--batch-size", "0"], ["--device", "x"]])
def test_demo_checks_its_arguments_first(tmp_path, nothing_read, capsys, options):
    """The demo failed after minutes of work, leaving a folder with rank_fit.png only."""
    out = tmp_path / "demo"
    assert cli.main(["-q", "demo", "--out", str(out), *options]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("sc-c2s: error: ")
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--n-genes", "0"], "error: --n-genes must be a positive integer, got 0."),
        (["--seed", "-1"], "error: --seed must be a whole number from 0 to 2**63 - 1; got -1.\n"),
        (["--seed", str(2**63)], f"error: --seed must be a whole number from 0 to 2**63 - 1; got {2**63}.\n"),
        (
            ["--top-k", "-1"],
            "error: --top-k must be a positive whole number, or 0 for no top-k sampling; got -1.\n",
        ),
        (
            ["--top-p", "0"],
            "error: --top-p must be a number above 0 and at most 1, where 1 is no nucleus sampling; got 0.\n",
        ),
        (
            ["--top-p", "nan"],
            "error: --top-p must be a number above 0 and at most 1, where 1 is no nucleus sampling; got nan.\n",
        ),
        (["--temperature", "0"], "error: --temperature must be a finite number > 0, got 0.0."),
        (["--device", "nosuch"], "error: --device 'nosuch' is not a torch device"),
    ],
)
def test_errors_name_the_options(tmp_path, capsys, options, message):
    """Messages named the Python arguments (`n_genes`, `random_state`), offered None for --temperature, --top-k and
    --top-p (whose none is 0 and 1), and numpy Generators for --seed."""
    argv = ["-q", "generate", "--model", "demo", "--cell-types", "B", "--out", str(tmp_path / "x.h5ad"), *options]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "`" not in err
    assert "or None" not in err


def test_option_names_follow_the_parser():
    parser = cli._parser()
    names = cli._option_names(
        parser, parser.parse_args(["generate", "--model", "m", "--cell-types", "B", "--out", "x"])
    )
    assert names["n_genes"] == "--n-genes"
    assert names["random_state"] == "--seed"
    assert names["quiet"] == "--quiet"
    assert "n_cells" not in names  # demo's: cells to generate per type
    assert cli._option_names(parser, parser.parse_args(["demo"]))["n_cells"] == "--n-cells"
    fetch = cli._option_names(parser, parser.parse_args(["models", "fetch", "m"]))
    assert set(fetch.values()) == {
        "--help",
        "--version",
        "--verbose",
        "no --verbose",
        "--quiet",
        "no --quiet",
        "--revision",
    }
    assert (
        cli._in_options("`device=None` picks cpu; `n_genes` of `adata`", names)
        == "no --device picks cpu; --n-genes of `adata`"
    )
    # a name with nothing after its "=" is the option alone (it used to become "--layer " with a stray space)
    assert cli._in_options("`X` (`use_raw=False` without `layer=`).", names) == "`X` (--no-raw without --layer)."
    # a flag is given or left out, whatever the Python value (`allow_repeats=True` read "--allow-repeats True")
    assert cli._in_options("`.raw` (`use_raw=True`); `allow_repeats=True`", names) == (
        "`.raw` (no --no-raw); --allow-repeats"
    )


@pytest.mark.filterwarnings("always::UserWarning")
def test_warnings_are_one_line(tmp_path, checkpoint, small_file, capsys):
    """A single --labels showed a UserWarning with cli.py:NNN and the Python source line."""
    argv = ["annotate", str(small_file), "--model", str(checkpoint), "--labels", "A549", "--n-genes", "10"]
    assert cli.main([*argv, "--gene-symbols", "gene_symbol", "--out", str(tmp_path / "out.h5ad")]) == cli.EXIT_OK
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if "single label" in line]
    assert warning.startswith("sc-c2s: warning: --labels holds a single label")
    assert "no --labels to let the model write them" in warning
    assert "UserWarning" not in err
    assert "cli.py" not in err


def test_layer_and_gene_symbols_rank_again(tmp_path, checkpoint, cellbench, capsys):
    """--layer and --gene-symbols were ignored, silently, for an input that already had sentences."""
    cells = cellbench[::10].copy()
    cells.layers["counts"] = cells.X.copy()
    sc_c2s.pp.to_sentences(cells)
    cells.write_h5ad(path := tmp_path / "ranked.h5ad")
    argv = ["annotate", str(path), "--model", str(checkpoint), "--labels", "model", "--n-genes", "10"]
    argv += ["--layer", "counts", "--gene-symbols", "gene_symbol", "--out", str(tmp_path / "out.h5ad")]
    assert cli.main(argv) == cli.EXIT_OK
    assert "ranking genes again, with --layer 'counts' and --gene-symbols 'gene_symbol'" in capsys.readouterr().err
    params = ad.read_h5ad(tmp_path / "out.h5ad").uns["c2s"]["params"]
    assert params["layer"] == "counts"
    assert params["gene_symbols"] == "gene_symbol"


def test_no_raw_ranks_x_where_raw_exists(tmp_path, checkpoint, cellbench, capsys):
    """The command ranked .raw whenever it existed: there was no way to rank X instead."""
    cells = cellbench[::10].copy()
    cells.raw = cells
    cells = cells[:, :500].copy()
    cells.write_h5ad(path := tmp_path / "with_raw.h5ad")
    argv = ["annotate", str(path), "--model", str(checkpoint), "--labels", "model", "--n-genes", "10"]
    argv += ["--gene-symbols", "gene_symbol"]  # the model's words
    for extra, use_raw, n_genes in (([], True, cellbench.n_vars), (["--no-raw"], False, 500)):
        assert cli.main([*argv, *extra, "--out", str(out := tmp_path / "out.h5ad")]) == cli.EXIT_OK
        c2s = ad.read_h5ad(out).uns["c2s"]
        assert c2s["params"]["use_raw"] == use_raw
        assert len(c2s["genes"]) == n_genes
    sc_c2s.pp.to_sentences(cells, gene_symbols="gene_symbol")
    cells.write_h5ad(path)
    assert cli.main([*argv, "--no-raw", "--out", str(out)]) == cli.EXIT_OK
    assert "ranking genes again, with --gene-symbols 'gene_symbol' and --no-raw" in capsys.readouterr().err
    assert not ad.read_h5ad(out).uns["c2s"]["params"]["use_raw"]


def test_sentences_of_the_input_are_kept_without_ranking_options(tmp_path, checkpoint, cellbench, capsys):
    cells = cellbench[::10].copy()
    sc_c2s.pp.to_sentences(cells, gene_symbols="gene_symbol")
    cells.write_h5ad(path := tmp_path / "ranked.h5ad")
    argv = ["annotate", str(path), "--model", str(checkpoint), "--labels", "model", "--n-genes", "10"]
    assert cli.main([*argv, "--out", str(tmp_path / "out.h5ad")]) == cli.EXIT_OK
    assert "ranking" not in capsys.readouterr().err


def test_no_rank_fit_annotates_binarised_data(tmp_path, checkpoint, cellbench, capsys):
    """Annotation does not use the rank fit, but the command fitted it always: binarised data could not be annotated,
    and the error said to pass `rank_fit=False`, which the command had no option for."""
    cells = cellbench[::10].copy()
    cells.X = (cells.X > 0).astype(np.float32)
    cells.write_h5ad(path := tmp_path / "binary.h5ad")
    argv = ["annotate", str(path), "--model", str(checkpoint), "--labels", "model", "--n-genes", "10"]
    argv += ["--gene-symbols", "gene_symbol", "--out", str(out := tmp_path / "out.h5ad")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert (
        capsys.readouterr()
        .err.rstrip()
        .endswith("Rank counts or normalised values (--layer, --no-raw), or pass --no-rank-fit.")
    )
    assert cli.main([*argv, "--no-rank-fit"]) == cli.EXIT_OK
    annotated = ad.read_h5ad(out)
    assert "rank_fit" not in annotated.uns["c2s"]
    assert annotated.obs["c2s_cell_type"].isin(cellbench.obs["cell_type"]).all()


def test_generate_ranks_data_without_rank_fit_again(tmp_path, checkpoint, cellbench, capsys):
    """Generated cells are reconstructed through the rank fit of --data; sentences made with `rank_fit=False` made
    the command fail, telling to run `sc_c2s.pp.to_sentences` in Python."""
    cells = cellbench[::10].copy()
    sc_c2s.pp.to_sentences(cells, gene_symbols="gene_symbol", rank_fit=False)
    cells.write_h5ad(path := tmp_path / "no_fit.h5ad")
    argv = ["generate", "--model", str(checkpoint), "--cell-types", "A549=2", "--n-genes", "5", "--data", str(path)]
    assert cli.main([*argv, "--out", str(out := tmp_path / "out.h5ad")]) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "the input has cell sentences without their rank -> expression fit; ranking them again" in err
    expected = sc_c2s.pp.to_sentences(cells, gene_symbols="gene_symbol", copy=True).uns["c2s"]["rank_fit"]
    fit = ad.read_h5ad(out).uns["c2s_generate"]["params"]["rank_fit"]
    assert (fit["slope"], fit["intercept"]) == (expected["slope"], expected["intercept"])


@pytest.mark.filterwarnings("always::UserWarning")
def test_quiet_hides_warnings(tmp_path, checkpoint, small_file, capsys):
    """-q showed the UserWarnings of sc_c2s (and mudata's FutureWarnings)."""
    argv = ["-q", "annotate", str(small_file), "--model", str(checkpoint), "--labels", "A549", "--n-genes", "10"]
    assert cli.main([*argv, "--gene-symbols", "gene_symbol", "--out", str(tmp_path / "out.h5ad")]) == cli.EXIT_OK
    assert capsys.readouterr().err == ""


@pytest.fixture
def too_long(tmp_path, checkpoint, small_file) -> list[str]:
    """An annotate command line whose prompts are longer than the checkpoint reads."""
    argv = ["annotate", str(small_file), "--model", str(checkpoint), "--labels", "model", "--n-genes", "600"]
    return [*argv, "--gene-symbols", "gene_symbol", "--out", str(tmp_path / "out.h5ad")]


TOO_LONG = (
    r"sc-c2s: error: The longest prompt and answer has \d+ tokens, but 'tiny-cli' reads at most \d+; "
    r"lower --n-genes\.\n"
)


def test_too_long_names_the_options_of_annotate(too_long, env):
    """The error offered --n-cells, an option of `demo` only, and -q showed transformers' warning before it."""
    result = sc_c2s_command("-q", *too_long, env=env)
    assert result.returncode == cli.EXIT_USAGE
    assert re.fullmatch(TOO_LONG, result.stderr), result.stderr


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_hides_the_transformers_log(too_long, capsys, monkeypatch, quiet):
    """-q let transformers log "Token indices sequence length is longer than the specified maximum …"."""
    shown = []
    handler = logging.Handler()
    monkeypatch.setattr(handler, "emit", lambda record: shown.append(record.getMessage()))
    transformers_log = logging.getLogger("transformers")
    monkeypatch.setattr(transformers_log, "handlers", [handler])  # its own is bound to the stderr of its import
    monkeypatch.delenv(cli.TRANSFORMERS_VERBOSITY, raising=False)
    level = transformers_log.level
    assert cli.main([*(["-q"] if quiet else []), *too_long]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert re.fullmatch(TOO_LONG, err if quiet else err.splitlines(keepends=True)[-1]), err
    assert [m.startswith("Token indices sequence length is longer") for m in shown] == ([] if quiet else [True])
    assert transformers_log.level == level
    assert cli.TRANSFORMERS_VERBOSITY not in os.environ


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_hides_the_download_log(publish, checkpoint, capsys, monkeypatch, quiet):
    """-q showed pooch's "Downloading file …" lines."""
    shown = []
    handler = logging.Handler()
    monkeypatch.setattr(handler, "emit", lambda record: shown.append(record.getMessage()))
    monkeypatch.setattr(pooch.get_logger(), "handlers", [handler])  # its own is bound to the stderr of its import
    publish("tiny-cli", checkpoint)
    assert cli.main([*(["-q"] if quiet else []), "models", "fetch", "tiny-cli"]) == cli.EXIT_OK
    assert Path(capsys.readouterr().out.strip(), "config.json").is_file()
    assert bool(shown) != quiet
    assert all(message.startswith("Downloading file") for message in shown)


@pytest.mark.parametrize(("command", "out"), [("annotate", "b.csv"), ("annotate", "b"), ("generate", "b.h5")])
def test_output_must_be_h5ad(tmp_path, small_file, nothing_read, capsys, command, out):
    """--out r/b.csv wrote an .h5ad file called b.csv."""
    argv = ["annotate", str(small_file)] if command == "annotate" else ["generate", "--cell-types", "B"]
    assert cli.main([*argv, "--model", "demo", "--out", str(tmp_path / out)]) == cli.EXIT_USAGE
    assert "the result is an AnnData; name an .h5ad file" in capsys.readouterr().err
    assert not (tmp_path / out).exists()


def test_help_says_what_the_defaults_are(capsys):
    """generate --help showed --temperature's default as None."""
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "None" not in text
    assert "sampling temperature (default: the one recorded with the model, else 1.0)" in text
    assert "[--seed SEED]" in text


def test_help_is_ascii(capsys):
    """`sc-c2s demo --help > file` failed on Windows: a redirected stdout encodes in the locale's code page
    (cp1252), which has no "→"."""
    commands = [[], ["demo"], ["annotate"], ["generate"], ["models"], ["models", "list"], ["models", "fetch"]]
    for command in commands:
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        out = capsys.readouterr().out
        assert out.isascii(), (command, [c for c in out if not c.isascii()])


def test_models_list_marks_unconfirmed_licences(capsys):
    """Licences the registry could not confirm were listed as certain."""
    assert cli.main(["models", "list"]) == cli.EXIT_OK
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    known = sc_c2s.models.available()
    assert "license" in known.loc["C2S-Pythia-410m-cell-type-prediction", "unconfirmed"]
    for name, entry in known.iterrows():
        if entry["license"] is None:
            assert lines[name].endswith("see the model card")
        elif "license" in entry["unconfirmed"]:
            assert lines[name].endswith(f"{entry['license']} (unconfirmed)")
        else:
            assert lines[name].endswith(entry["license"])


@pytest.mark.parametrize(("verbosity", "level"), [(None, logging.WARNING), ("info", logging.INFO)])
def test_quiet_gives_transformers_its_own_level_when_it_imported_it(verbosity, level):
    """`main(["-q", ...])` in a Python session that had not imported transformers left its log at NOTSET: the
    session's root level (INFO in a notebook's `basicConfig`) then let transformers' information through."""
    code = (
        "import logging, sys\n"
        "from sc_c2s import cli\n"
        "assert 'transformers' not in sys.modules\n"
        "with cli._transformers_errors_only():\n"
        "    import transformers\n"
        "print(logging.getLogger('transformers').level)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != cli.TRANSFORMERS_VERBOSITY}
    if verbosity is not None:
        env[cli.TRANSFORMERS_VERBOSITY] = verbosity
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(result.stdout) == level
