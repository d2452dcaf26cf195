"""Cell2Sentence for Scanpy: cells as ranked gene sentences, read and written by language models."""

from __future__ import annotations

from importlib.metadata import version

from . import models, pl, pp, prompts, tl
from ._rank_model import RankFit

__all__ = ["RankFit", "models", "pl", "pp", "prompts", "tl"]

__version__ = version("sc-c2s")
