"""Plotting."""

from __future__ import annotations

from ._generation import generation
from ._perturbation import perturbation
from ._rank_fit import rank_fit

__all__ = ["generation", "perturbation", "rank_fit"]
