"""The quick-start page's code runs top to bottom, so that what a new user copies works."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib as mpl
import pytest
import scanpy as sc
from matplotlib import pyplot as plt

QUICKSTART = Path(__file__).parents[1] / "docs" / "quickstart.md"


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a MyST page, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_finds_the_blocks():
    assert python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n") == [
        "x = 1\n",
        "y = 2\n",
    ]


@pytest.mark.usefixtures("one_torch_thread", "few_temperature_cells")
def test_runs(tmp_path, monkeypatch):
    from sc_c2s.models import _trainer

    blocks = python_blocks(QUICKSTART.read_text())
    assert len(blocks) >= 7
    assert any("finetune(" in block for block in blocks)
    monkeypatch.chdir(tmp_path)  # the fine-tuned model goes to ./my_model
    # finetune is the page's own call, on a smaller budget to stay within the test budget: 10 steps instead of the
    # default, scored once at the end instead of at every step
    monkeypatch.setattr(_trainer, "SCRATCH_STEPS", 10)
    monkeypatch.setattr(_trainer, "N_EVALUATIONS", 1)
    autoshow, sc.settings.autoshow = sc.settings.autoshow, False
    try:
        with mpl.rc_context({"backend": "agg"}):
            namespace: dict[str, object] = {}
            for block in blocks:
                exec(compile(block, str(QUICKSTART), "exec"), namespace)
    finally:
        sc.settings.autoshow = autoshow
        plt.close("all")
    assert {"c2s_cell_type", "c2s_label", "c2s_label_score"} <= set(namespace["adata"].obs.columns)
    assert (tmp_path / "my_model" / "c2s_metadata.json").is_file()
