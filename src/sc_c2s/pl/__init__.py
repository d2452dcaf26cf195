"""Plotting."""

from __future__ import annotations

from ._rank_fit import rank_fit

__all__ = ["rank_fit"]
