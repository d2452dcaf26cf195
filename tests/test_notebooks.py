"""The tutorials run from top to bottom, so they cannot rot, and they are committed with their outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

TUTORIALS = Path(__file__).parents[1] / "docs" / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
DATA = Path(__file__).parent / "data"
#: Values that replace those of each notebook's "parameters" cell here, to keep the test within CI time.
FAST = {
    "sentences_and_annotation": "n_cells = 60",
    "finetune_and_generate": "max_steps = 4\nn_genes = 16\nn_generated = 2",
    "tissues_and_summaries": f"epochs = 2\nn_genes = 5\ndata = {str(DATA / 'tissue_mouse_300.h5ad')!r}",
    "perturbation": f"data = {str(DATA / 'kang_400.h5ad')!r}\nepochs = 1\nn_genes = 12",
}


def test_every_tutorial_is_tested():
    assert {p.stem for p in NOTEBOOKS} == set(FAST)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "run the notebook before committing it"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "run the notebook from top to bottom in a fresh kernel"
    outputs = [o for c in code for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "plots must be visible on the docs site"
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stderr")
    # tqdm.auto warns once per kernel when ipywidgets is missing and falls back to text bars: not ours to fix here
    warnings = [line for line in stderr.splitlines() if "Warning" in line and "TqdmWarning: IProgress" not in line]
    assert not warnings, "warnings in the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # the kernel's idle OpenMP threads sleep rather than spin, which on a busy 2-core runner starved the working
    # ones (as .ci/run sets it for the whole run; here for `python -m pytest` alone too)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")

    nb = nbformat.read(path, as_version=4)
    (where,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(where + 1, nbformat.v4.new_code_cell(FAST[path.stem], metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
