"""Preprocessing: cells to sentences."""

from __future__ import annotations

from ._rank import NotExpressionError
from ._to_sentences import to_sentences

__all__ = ["NotExpressionError", "to_sentences"]
