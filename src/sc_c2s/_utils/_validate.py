"""Argument checks shared by the verbs: each error message exists once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

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


def check_obs_column(obs: pd.DataFrame, key: str, *, arg: str, where: str = "obs") -> pd.Series:
    """Return ``obs[key]``, or raise a :class:`KeyError` naming the argument `arg` and the columns there are."""
    if key not in obs.columns:
        msg = f"`{arg}={key!r}` is not a column of {where}; columns: {list(obs.columns)}."
        raise KeyError(msg)
    return obs[key]


def check_rank_fit(c2s: dict[str, Any]) -> dict[str, Any]:
    """Return the rank fit of ``uns["c2s"]``, or raise a :class:`KeyError` saying how to make one."""
    if "rank_fit" not in c2s:
        msg = "No rank fit in `uns['c2s']`; run `sc_c2s.pp.to_sentences(adata, rank_fit=True)` first."
        raise KeyError(msg)
    return c2s["rank_fit"]
