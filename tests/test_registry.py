"""The data of the checkpoint registry (src/sc_c2s/models/registry.json) and how it is read."""

from __future__ import annotations

import re

import pytest

from sc_c2s.models import _registry

COMMIT = re.compile(r"[0-9a-f]{40}")
#: Entries whose revision is still a branch, with the reason. A new entry names a commit; one listed here leaves the
#: list once ``python scripts/update_registry.py NAME`` has pinned it where Hugging Face is reachable.
UNPINNED = {
    "C2S-Pythia-410m-cell-type-conditioned-cell-generation": (
        "main (short hash 5568661): its full commit hash was neither readable on Hugging Face from these machines nor "
        "found in public sources"
    ),
    "C2S-Pythia-410m-diverse-single-and-multi-cell-tasks": (
        "main (short hash a95e6b5): its full commit hash was neither readable on Hugging Face from these machines nor "
        "found in public sources"
    ),
}


def test_every_revision_is_a_commit_or_a_listed_exception():
    unpinned = {name for name, e in _registry.registry().items() if not COMMIT.fullmatch(e.revision)}
    assert unpinned <= set(UNPINNED), f"pin these to a commit: {sorted(unpinned - set(UNPINNED))}"
    assert set(UNPINNED) <= unpinned, f"pinned now, remove from UNPINNED: {sorted(set(UNPINNED) - unpinned)}"
    assert all("revision" in _registry.registry()[name].unconfirmed for name in UNPINNED)


@pytest.mark.parametrize("name", list(_registry.registry()))
def test_entry_says_where_its_values_come_from_and_pins_hashes_to_a_commit(name):
    entry = _registry.registry()[name]
    assert entry.name == name
    assert len(entry.source) > 20 and entry.source.endswith(".")
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in entry.sha256.values())
    if entry.sha256:
        assert COMMIT.fullmatch(entry.revision), "hashes hold for a commit, not for a branch that moves"
        shards = set(entry.sha256) - set(entry.files)
        assert set(entry.files) <= set(entry.sha256)
        assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
        assert not shards or any(f.endswith(".index.json") for f in entry.files)


def test_registry_is_read_once():
    assert _registry.registry() is _registry.registry()
    assert _registry.REGISTRY is _registry.registry()


def test_unknown_field_is_an_error():
    data = {**_registry.registry()["pythia-160m-c2s"].__dict__, "context_lenght": 2048}
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    with pytest.raises(ValueError, match=r"'pythia-160m-c2s'.*unknown fields \['context_lenght'\]"):
        _registry._entry(data)
