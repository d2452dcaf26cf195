"""The shared argument checks of sc_c2s._utils._validate: one helper per kind of check."""

from __future__ import annotations

import numpy as np
import pytest

from sc_c2s._utils import _validate
from sc_c2s._utils._validate import (
    LEGACY_SEED_LIMIT,
    SEED_LIMIT,
    check_fits_in_memory,
    check_key,
    check_number,
    check_random_state,
)


def test_random_state_kinds():
    assert check_random_state(np.int64(5)) == 5
    assert check_random_state(SEED_LIMIT - 1) == SEED_LIMIT - 1
    np.random.seed(0)
    drawn = check_random_state(None)
    np.random.seed(0)
    assert check_random_state(None) == drawn  # NumPy's global state, as scanpy reads None
    assert check_random_state(np.random.default_rng(3)) == np.random.default_rng(3).integers(SEED_LIMIT)
    assert check_random_state(np.random.RandomState(3)) == np.random.RandomState(3).randint(SEED_LIMIT, dtype=np.int64)
    assert 0 <= check_random_state(np.random.default_rng(3), limit=LEGACY_SEED_LIMIT) < LEGACY_SEED_LIMIT
    for bad in (-1, SEED_LIMIT, 1.0, "1", True, [1]):
        with pytest.raises(ValueError, match=r"`seed` must be an integer in \[0, 2\*\*63\)"):
            check_random_state(bad, "seed")
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        check_random_state(LEGACY_SEED_LIMIT, limit=LEGACY_SEED_LIMIT)


def test_number():
    assert check_number(1, "x", low=0, low_open=True) == 1.0
    assert check_number(None, "x", none_ok=True) is None
    for bad, match in [
        (0, r"`x` must be a finite number > 0 and <= 1, got 0"),
        (1.5, "<= 1"),
        (float("nan"), "got nan"),
        (float("inf"), "got inf"),
        ("0.5", "got '0.5'"),
        (True, "got True"),
        (None, "got None"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_number(bad, "x", low=0, high=1, low_open=True)


@pytest.mark.parametrize("bad", ["", None, 3, b"key"])
def test_key(bad):
    with pytest.raises(TypeError, match="`key_added` must be a non-empty string"):
        check_key(bad, "key_added")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("c2s", r"`key_added='c2s'` would replace sc_c2s's own results"),
        ("c2s_genes", r"`key_added='c2s_genes'` would replace"),
        ("c2s_sentence", r"`key_added='c2s_sentence'` would replace"),
        ("a/b", r"`key_added='a/b'` holds a '/'.*choose a key without it"),
    ],
)
def test_key_of_the_package_or_with_a_slash(bad, match):
    """Such keys used to be accepted: results replaced `uns['c2s']` or `obsm['c2s_genes']`, or could not be saved."""
    with pytest.raises(ValueError, match=match):
        check_key(bad, "key_added")


def test_memory_of_a_container_is_its_control_group(tmp_path, monkeypatch):
    limit, usage, stat = tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat"
    limit.write_text("1000\n")
    usage.write_text("400\n")
    monkeypatch.setattr(_validate, "_CGROUP_FILES", ((str(limit), str(usage), str(stat), "inactive_file "),))
    assert _validate.available_memory() == 600  # no statistics: all the usage counts
    # files read are cached and counted as used; the kernel drops the inactive cache when memory is needed
    stat.write_text("anon 100\nfile 300\nactive_file 50\ninactive_file 250\n")
    assert _validate.available_memory() == 850
    limit.write_text("max\n")  # no limit: the machine's
    assert _validate.available_memory() > 600
    with pytest.raises(ValueError, match=r"`n` asks for 7 cells, .* about 6 cells fit\. Fewer\."):
        monkeypatch.setattr(_validate, "available_memory", lambda: 600)
        check_fits_in_memory(7, 100, name="n", unit="cells", fix="Fewer.")
    monkeypatch.setattr(_validate, "available_memory", lambda: None)
    check_fits_in_memory(10**15, 10**6, name="n", unit="cells", fix="")  # unknown: not checked


def test_memory_a_checkpoint_may_take_on_the_cpu_is_the_containers(tmp_path, monkeypatch):
    """`models.load` measured a checkpoint against the machine's memory (psutil or /proc/meminfo), not the
    container's: in a container of 8 GiB it began downloading a model of 10 GiB, for the kernel to kill."""
    import torch

    from sc_c2s.models import _memory

    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("1000\n")
    usage.write_text("400\n")
    monkeypatch.setattr(_validate, "_CGROUP_FILES", ((str(limit), str(usage), str(tmp_path / "stat"), "x"),))
    assert _memory.capacity(torch.device("cpu")) == 600
