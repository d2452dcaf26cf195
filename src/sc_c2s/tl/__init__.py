"""Tools: reading and writing cell sentences with language models."""

from __future__ import annotations

from ._annotate import annotate
from ._from_sentences import from_sentences

__all__ = ["annotate", "from_sentences"]
