"""Tools: reading and writing cell sentences with language models."""

from __future__ import annotations

from ._annotate import annotate
from ._embed import embed
from ._finetune import finetune
from ._from_sentences import from_sentences
from ._generate import generate
from ._predict_perturbation import predict_perturbation
from ._predict_tissue import predict_tissue
from ._score_generation import score_generation
from ._score_perturbation import score_perturbation
from ._summarize import summarize

__all__ = [
    "annotate",
    "embed",
    "finetune",
    "from_sentences",
    "generate",
    "predict_perturbation",
    "predict_tissue",
    "score_generation",
    "score_perturbation",
    "summarize",
]
