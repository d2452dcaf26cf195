"""Argument checks shared by the verbs: each error message exists once."""

from __future__ import annotations

import math
import os
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np

from sc_c2s import _keys

if TYPE_CHECKING:
    import pandas as pd


def is_positive_int(value: object) -> bool:
    """Whether `value` is an integer (Python or NumPy, not a bool) of at least 1."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


def check_positive_int(value: Any, name: str, *, none_ok: bool = False) -> int | None:
    """Return `value` as an ``int`` if it is a positive integer (or ``None`` when `none_ok`), else raise.

    Examples
    --------
    >>> check_positive_int(3, "n_genes")
    3
    >>> check_positive_int(0, "n_genes")
    Traceback (most recent call last):
    ...
    ValueError: `n_genes` must be a positive integer, got 0.
    """
    if value is None and none_ok:
        return None
    if not is_positive_int(value):
        msg = f"`{name}` must be a positive integer{' or None' if none_ok else ''}, got {value!r}."
        raise ValueError(msg)
    return int(value)


def check_flag(value: Any, name: str, *, none_ok: bool = False) -> bool | None:
    """Return `value` as a ``bool`` if it is one (Python or NumPy; or ``None`` when `none_ok`), else raise.

    Anything else is refused rather than read as true or false: the string ``"False"`` is truthy.

    Examples
    --------
    >>> check_flag(np.True_, "unique_genes")
    True
    >>> check_flag("False", "unique_genes")
    Traceback (most recent call last):
    ...
    ValueError: `unique_genes` must be True or False, got 'False'.
    """
    if value is None and none_ok:
        return None
    if not isinstance(value, bool | np.bool_):
        msg = f"`{name}` must be True{', False or None' if none_ok else ' or False'}, got {value!r}."
        raise ValueError(msg)
    return bool(value)


def check_name(value: Any, arg: str, *, what: str) -> Any:
    """Return `value` if it can name one `what` (a column, a layer, a modality), else raise a :class:`TypeError`.

    A list names several, which an argument taking one name cannot use.
    """
    if not isinstance(value, Hashable):
        msg = f"`{arg}` must be the name of one {what}, got {value!r}."
        raise TypeError(msg)
    return value


def check_obs_column(obs: pd.DataFrame, key: str, *, arg: str, where: str = "obs") -> pd.Series:
    """Return ``obs[key]``, or raise a :class:`KeyError` naming the argument `arg` and the columns there are."""
    if check_name(key, arg, what=f"column of {where}") not in obs.columns:
        msg = f"`{arg}={key!r}` is not a column of {where}; columns: {list(obs.columns)}."
        raise KeyError(msg)
    return obs[key]


def check_rank_fit(c2s: dict[str, Any]) -> dict[str, Any]:
    """Return the rank fit of ``uns["c2s"]``, or raise a :class:`KeyError` saying how to make one."""
    if "rank_fit" not in c2s:
        msg = "No rank fit in `uns['c2s']`; run `sc_c2s.pp.to_sentences(adata, rank_fit=True)` first."
        raise KeyError(msg)
    return c2s["rank_fit"]


#: What a ``random_state`` argument accepts (see :func:`check_random_state`).
AnyRandom = int | np.integer | np.random.Generator | np.random.RandomState | None
#: Seeds are integers in ``[0, 2**63)``: they fit NumPy's and torch's generators and the ranking kernels' int64.
SEED_LIMIT = 2**63
#: Seeds handed to scanpy's and scikit-learn's functions, which make a :class:`numpy.random.RandomState` of them.
LEGACY_SEED_LIMIT = 2**32


def check_random_state(value: Any, name: str = "random_state", *, limit: int = SEED_LIMIT) -> int:
    """Return the integer seed that `value` stands for, the way scanpy reads a ``random_state``.

    An integer in ``[0, limit)`` is the seed. ``None`` draws one from NumPy's global random state (so
    :func:`numpy.random.seed` makes it reproducible), and a :class:`numpy.random.Generator` or
    :class:`numpy.random.RandomState` draws one from itself (advancing it). Verbs record the seed they used in
    their parameters, so any result can be made again with an integer. Verbs that hand the seed to scanpy or
    scikit-learn pass ``limit=LEGACY_SEED_LIMIT``.

    Examples
    --------
    >>> check_random_state(7)
    7
    >>> check_random_state(-1)
    Traceback (most recent call last):
    ...
    ValueError: `random_state` must be an integer in [0, 2**63), None, or a numpy Generator or RandomState; got -1.
    """
    if isinstance(value, np.random.Generator):
        return int(value.integers(limit))
    if value is None:  # scanpy's meaning: NumPy's global random state
        return int(np.random.randint(limit, dtype=np.int64))
    if isinstance(value, np.random.RandomState):
        return int(value.randint(limit, dtype=np.int64))
    if isinstance(value, int | np.integer) and not isinstance(value, bool) and 0 <= value < limit:
        return int(value)
    bits = int(limit).bit_length() - 1
    msg = f"`{name}` must be an integer in [0, 2**{bits}), None, or a numpy Generator or RandomState; got {value!r}."
    raise ValueError(msg)


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    none_ok: bool = False,
) -> float | None:
    """Return `value` as a ``float`` if it is a finite real number within the bounds, else raise.

    `low` and `high` are included unless `low_open` or `high_open`; ``None`` passes when `none_ok`.

    Examples
    --------
    >>> check_number(0.5, "top_p", low=0, high=1, low_open=True)
    0.5
    >>> check_number(float("nan"), "temperature", low=0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: `temperature` must be a finite number > 0, got nan.
    """
    if value is None and none_ok:
        return None
    is_real = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
    if (
        not is_real
        or not math.isfinite(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    ):
        bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
        bounds += [f"{'<' if high_open else '<='} {high:g}"] if high is not None else []
        where = f" {' and '.join(bounds)}" if bounds else ""
        msg = f"`{name}` must be a finite number{where}{' or None' if none_ok else ''}, got {value!r}."
        raise ValueError(msg)
    return float(value)


def check_key(value: Any, name: str) -> str:
    """Return `value` if it is a key of ``obs``, ``obsm`` or ``uns`` a verb may write its results to, else raise.

    A key is a non-empty string without ``"/"`` (which h5ad files cannot hold in keys) that is none of the keys
    the package keeps its own results under (``sc_c2s._keys.RESERVED``).

    Examples
    --------
    >>> check_key("ct", "key_added")
    'ct'
    >>> check_key("a/b", "key_added")
    Traceback (most recent call last):
    ...
    ValueError: `key_added='a/b'` holds a '/', which anndata will not allow in the keys of h5ad files; ...
    """
    if not isinstance(value, str) or not value:
        msg = f"`{name}` must be a non-empty string, got {value!r}."
        raise TypeError(msg)
    if value in _keys.RESERVED:
        msg = (
            f"`{name}={value!r}` would replace sc_c2s's own results, which the verbs read; choose another key "
            f"(not one of {sorted(_keys.RESERVED)})."
        )
        raise ValueError(msg)
    if "/" in value:
        msg = (
            f"`{name}={value!r}` holds a '/', which anndata will not allow in the keys of h5ad files; choose a key "
            "without it."
        )
        raise ValueError(msg)
    return value


def check_expression_dtype(X: Any, source: str) -> None:
    """Refuse a matrix whose values are not real numbers (e.g. strings, objects, complex numbers)."""
    dtype = np.dtype(getattr(X, "dtype", np.float64))
    if dtype.kind not in "biuf":
        msg = (
            f"`{source}` has dtype {dtype}, but expression must be real numbers (integer or floating point); "
            f"convert it first, e.g. `adata.X = adata.X.astype(np.float32)`."
        )
        raise TypeError(msg)


#: Memory limit, usage, and the statistics' line of the inactive file cache (reclaimable, counted in the usage) of
#: the process's control group (cgroup v2, then v1), which a container may set.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file "),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
        "total_inactive_file ",
    ),
)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or ``None`` if unknown.

    ``MemAvailable`` of ``/proc/meminfo`` where there is one (Linux), else what psutil says is available (macOS,
    Windows) where it is installed, else the physical memory; less where the control group of a container leaves
    less. A control group's usage counts the cache of files read, which the kernel drops when memory is needed: its
    inactive part is not counted as used (the working set, as Kubernetes and ``docker stats`` count it).
    """
    available = _read_number("/proc/meminfo", "MemAvailable:", scale=1024)
    if available is None:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:
            try:
                available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (AttributeError, OSError, ValueError):
                return None
    for limit_file, usage_file, stat_file, cache_key in _CGROUP_FILES:
        limit, usage = _read_number(limit_file), _read_number(usage_file)
        if limit is not None and usage is not None:
            cache = _read_number(stat_file, cache_key) or 0
            return max(0, min(available, limit - max(usage - cache, 0)))
    return available


def _read_number(path: str, key: str | None = None, *, scale: int = 1) -> int | None:
    """Read the number in a file of ``/proc`` or ``/sys`` (on the line starting with `key`); ``None`` if none."""
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                if key is None or line.startswith(key):
                    return int(line.split()[1 if key else 0]) * scale
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits_in_memory(n_items: int, bytes_per_item: float, *, name: str, unit: str, fix: str) -> None:
    """Refuse a request for `n_items` results of `bytes_per_item` each that would not fit in the available memory.

    The message says how much the request needs, how many items would fit, and `fix`. Where the available
    memory is unknown, nothing is checked.
    """
    available = available_memory()
    if available is None or n_items * bytes_per_item <= available:
        return
    fit = int(available // bytes_per_item)
    msg = (
        f"`{name}` asks for {n_items:,} {unit}, about {n_items * bytes_per_item / 2**30:.1f} GiB of results, but "
        f"only {available / 2**30:.1f} GiB of memory is available: about {fit:,} {unit} fit. {fix}"
    )
    raise ValueError(msg)
