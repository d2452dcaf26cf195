"""Plotting."""

from __future__ import annotations

from ._generation import generation
from ._rank_fit import rank_fit

__all__ = ["generation", "rank_fit"]
