"""The API reference lists every public name, so that nothing new goes undocumented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import sc_c2s

API = Path(__file__).parents[1] / "docs" / "api.md"


@pytest.mark.parametrize("module", ["pp", "tl", "pl", "models", "prompts"])
def test_api_page_lists_every_public_name(module):
    listed = set(re.findall(rf"^\s+{module}\.(\w+)$", API.read_text(), flags=re.MULTILINE))
    public = set(getattr(sc_c2s, module).__all__)
    assert public <= listed, f"add to docs/api.md: {sorted(public - listed)}"
    assert listed <= public, f"not public, remove from docs/api.md: {sorted(listed - public)}"


def test_api_page_lists_the_top_level_classes():
    classes = {name for name in sc_c2s.__all__ if isinstance(getattr(sc_c2s, name), type)}
    assert classes == {"RankFit"}
    listed = set(re.findall(r"^    (\w+)$", API.read_text(), flags=re.MULTILINE))
    assert classes <= listed, f"add to docs/api.md: {sorted(classes - listed)}"
