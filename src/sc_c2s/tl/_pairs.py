"""Control → perturbed pairs of the perturbation task: each perturbed cell with a random control cell of its group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scanpy import logging as logg

from sc_c2s._utils._validate import check_obs_column


def pair_groups(obs: pd.DataFrame, pair_by: str | Sequence[str] | None) -> np.ndarray:
    """Group code of each cell: the combination of its values in the `pair_by` columns (all ``0`` for ``None``)."""
    columns = [] if pair_by is None else [pair_by] if isinstance(pair_by, str) else list(pair_by)
    if not columns:
        return np.zeros(len(obs), dtype=np.int64)
    values = [check_obs_column(obs, c, arg="pair_by").astype(str) for c in columns]
    missing = [c for c, v in zip(columns, values, strict=True) if obs[c].isna().any()]
    if missing:
        msg = f"obs columns {missing} of `pair_by` have missing values; drop those cells or fill them in."
        raise ValueError(msg)
    codes, _ = pd.factorize(pd.MultiIndex.from_arrays(values) if len(values) > 1 else values[0])
    return codes.astype(np.int64)


class ControlPairs:
    """Draws a control cell of the same group for every perturbed cell.

    Parameters
    ----------
    groups
        Group code of every cell (:func:`pair_groups`).
    controls
        Positions of the control cells.
    perturbed
        Positions of the perturbed cells; each must have a control cell in its group (:func:`design` keeps
        only those).
    """

    def __init__(self, groups: np.ndarray, controls: np.ndarray, perturbed: np.ndarray):
        order = controls[np.argsort(groups[controls], kind="stable")]
        sorted_groups = groups[order]
        self.controls = order
        self.start = np.searchsorted(sorted_groups, groups[perturbed], side="left")
        self.count = np.searchsorted(sorted_groups, groups[perturbed], side="right") - self.start

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Draw a control cell for each perturbed cell, uniformly within its group from `rng`."""
        return self.controls[self.start + (rng.random(len(self.start)) * self.count).astype(np.int64)]


@dataclass
class Design:
    """The perturbed cells to train on, the perturbation of each, and their control cells to draw from."""

    perturbed: np.ndarray
    """Positions of the perturbed cells."""
    perturbations: list[str]
    """Perturbation (condition) of each perturbed cell."""
    pairs: ControlPairs


def conditions(obs: pd.DataFrame, *, condition_key: str, control: str) -> pd.Series:
    """Return the conditions as strings, checked: present, complete, one line each, `control` among them.

    `control` is compared as a string too, so that ``control=0`` finds the control cells of a column of 0 and 1.
    """
    values = check_obs_column(obs, condition_key, arg="condition_key")
    if values.isna().any():
        msg = f"obs[{condition_key!r}] has {int(values.isna().sum())} missing values; drop those cells or fill them in."
        raise ValueError(msg)
    values = values.astype(str)
    if str(control) not in set(values):
        msg = f"`control={control!r}` is not a value of obs[{condition_key!r}]; values: {sorted(set(values))[:20]}."
        raise ValueError(msg)
    bad = [v for v in set(values) if not v.strip() or "\n" in v]
    if bad:
        msg = f"obs[{condition_key!r}] has empty or multi-line conditions (e.g. {bad[0]!r}); a prompt names one line."
        raise ValueError(msg)
    return values


def design(
    obs: pd.DataFrame, *, condition_key: str, control: str, pair_by: str | Sequence[str] | None, usable: np.ndarray
) -> Design:
    """Pair the `usable` perturbed cells with the `usable` control cells of their `pair_by` group.

    Perturbed cells of a group without control cells are left out with a warning.
    """
    values = conditions(obs, condition_key=condition_key, control=control)
    groups = pair_groups(obs, pair_by)
    is_control = (values == str(control)).to_numpy()
    controls = np.flatnonzero(is_control & usable)
    perturbed = np.flatnonzero(~is_control & usable)
    paired = np.isin(groups[perturbed], groups[controls])
    if not paired.all():
        logg.warning(
            f"{int((~paired).sum())} perturbed cells have no control cell in their `pair_by` group and are left out"
        )
    perturbed = perturbed[paired]
    if not len(perturbed):
        msg = (
            f"No perturbed cell (obs[{condition_key!r}] other than {control!r}) has a control cell of its `pair_by` "
            "group to be paired with; check `condition_key`, `control` and `pair_by`."
        )
        raise ValueError(msg)
    return Design(perturbed, values.iloc[perturbed].tolist(), ControlPairs(groups, controls, perturbed))
