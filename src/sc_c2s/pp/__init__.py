"""Preprocessing: cells to sentences."""

from __future__ import annotations

from ._to_sentences import to_sentences

__all__ = ["to_sentences"]
