"""C2S metadata of a checkpoint: what a model needs to be prompted and read correctly.

Checkpoints made by this package carry it as ``c2s_metadata.json`` beside the weights; published checkpoints get
the same fields from the registry.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: File name of the metadata inside a checkpoint directory.
METADATA_FILE = "c2s_metadata.json"
#: Single-cell tasks, one sample per cell, named after the prompt templates in :mod:`sc_c2s.prompts`.
SINGLE_CELL_TASKS = ("cell_type_prediction", "cell_type_generation")
#: Multi-cell tasks of C2S-Scale, one sample per group of cells of the same tissue and sample.
MULTI_CELL_TASKS = ("tissue_prediction", "tissue_generation", "summary")
#: The perturbation-response task (control cell sentence → perturbed cell sentence), one sample per perturbed cell.
PERTURBATION = "perturbation"
#: Tasks a checkpoint can be trained for.
TASKS = (*SINGLE_CELL_TASKS, *MULTI_CELL_TASKS, PERTURBATION)


@dataclass
class C2SMetadata:
    """What a C2S checkpoint needs beside its weights."""

    name: str = ""
    """Registry name or directory name."""
    prompt_style: str = "c2s"
    """Template family; ``"c2s"`` is the published format of :mod:`sc_c2s.prompts`."""
    tasks: list[str] = field(default_factory=lambda: list(SINGLE_CELL_TASKS))
    """Tasks the model was trained for."""
    organism: str = "Homo sapiens"
    """Organism named in prompts."""
    n_genes: int = 200
    """Genes per sentence the model was trained on."""
    upper_case: bool = True
    """Whether gene names are upper-cased in prompts."""
    answer_prefix: str | None = " "
    """What comes between a prompt's ``:`` and its answer in training: ``" "`` (this package's fine-tuning) or
    ``""`` (the published fine-tuning code, which tokenises prompt and answer apart and joins the ids);
    ``None``: unknown, detected on first use by constrained scoring (published checkpoints)."""
    vocabulary: list[str] | None = None
    """Gene words the model knows (``None``: any, as for published checkpoints)."""
    labels: list[str] | None = None
    """Cell types the model was trained on, when known."""
    tissues: list[str] | None = None
    """Tissues the model was trained on (tissue prediction and generation), when known."""
    rank_fit: dict[str, Any] | None = None
    """Rank → expression fit of the training data (see :class:`sc_c2s.RankFit`)."""
    training: dict[str, Any] = field(default_factory=dict)
    """How the model was trained (base model, data, split, epochs, learning rate…)."""
    scores: dict[str, Any] = field(default_factory=dict)
    """Held-out scores of constrained annotation, e.g. ``{"accuracy": 0.93, "macro_f1": 0.91}``; empty for a model
    not trained for ``"cell_type_prediction"`` (or without held-out cells)."""
    score_temperatures: dict[str, float] = field(default_factory=dict)
    """Temperatures that calibrate the scores of constrained annotation, keyed by the number of labels re-ranked
    (``"0"`` for the prediction prompt alone): :func:`sc_c2s.tl.annotate` divides the log-probabilities of the
    labels by the one of its `rerank` before the softmax. :func:`sc_c2s.tl.finetune` fits them on its held-out
    cells; without one the scores are the model's own."""
    temperature: float | None = None
    """Sampling temperature of :func:`sc_c2s.tl.generate` with this model unless one is passed, chosen by
    :func:`sc_c2s.tl.finetune` after training (``training["temperature_mmd"]`` holds what it compared);
    ``None``: 1.0, the model's own distribution."""
    perturbations: list[str] | None = None
    """Perturbations the model was trained to predict (task ``"perturbation"``), when known."""
    sentence_lengths: dict[str, int] | None = None
    """Median genes per sentence of each cell type's training cells (at most `n_genes`), recorded by
    :func:`sc_c2s.tl.finetune` for task ``"cell_type_generation"``: :func:`sc_c2s.tl.generate` asks each type for
    its own unless told otherwise. ``None``: `n_genes` for every type."""
    adapter: dict[str, Any] | None = None
    """The LoRA adapter of an adapter checkpoint, kept when :func:`~sc_c2s.models.load` merges it into its base
    (``merge=True``) as the record of that base; ``None`` for a model trained whole.

    Its ``method``, ``rank``, ``target_modules``, and the ``base`` model it applies to: ``model`` name, ``path``,
    ``revision`` and ``sha256`` of its files.
    """

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> C2SMetadata:
        """Build from a dict; unknown keys are ignored so newer files still load.

        Raises
        ------
        TypeError
            If a field holds a value of the wrong type (a file edited by hand), naming the field.
        ValueError
            If the rank fit is not one (see :meth:`sc_c2s.RankFit.from_dict`).
        """
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        _check_fields(known)
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def read(cls, directory: str | Path) -> C2SMetadata:
        """Read ``c2s_metadata.json`` from a checkpoint directory."""
        return cls.from_dict(json.loads((Path(directory) / METADATA_FILE).read_text(encoding="utf-8")))

    def to_json(self) -> str:
        """Return the text of ``c2s_metadata.json``.

        Raises
        ------
        TypeError, ValueError
            As :meth:`from_dict` would on reading the text back.
        """
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        _check_fields(json.loads(text))
        return text

    def write(self, directory: str | Path) -> Path:
        """Write ``c2s_metadata.json`` into a checkpoint directory and return its path.

        Raises
        ------
        TypeError, ValueError
            As :meth:`from_dict` would on reading the file back; nothing is written then.
        """
        text = self.to_json()
        path = Path(directory) / METADATA_FILE
        path.write_text(text + "\n", encoding="utf-8")
        return path


#: Fields that hold a list of strings, a JSON object, a string; those that may be ``null``.
_STRING_LISTS = frozenset({"tasks", "vocabulary", "labels", "tissues", "perturbations"})
_OBJECTS = frozenset({"rank_fit", "training", "scores", "adapter"})
_NULLABLE = frozenset(
    {
        "answer_prefix",
        "vocabulary",
        "labels",
        "tissues",
        "rank_fit",
        "temperature",
        "perturbations",
        "sentence_lengths",
        "adapter",
    }
)


def _check_fields(d: dict[str, Any]) -> None:
    """Raise if a field of `d` (metadata as read from JSON) does not hold what it must."""
    from sc_c2s._rank_model import RankFit

    for name, value in d.items():
        expected = _expected_type(name, value)
        if expected is not None:
            msg = f"the field {name!r} must be {expected}, not {value!r}"
            raise TypeError(msg)
    if d.get("rank_fit") is not None:
        RankFit.from_dict(d["rank_fit"])


def _expected_type(name: str, value: Any) -> str | None:
    """Return what the metadata field `name` must hold if `value` is not that, else ``None``."""
    if value is None and name in _NULLABLE:
        return None
    if name in _STRING_LISTS:
        ok, expected = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    elif name in _OBJECTS:
        ok, expected = isinstance(value, dict), "an object"
    elif name == "n_genes":
        ok, expected = _positive_int(value), "a positive integer"
    elif name == "temperature":
        ok, expected = _positive(value), "a positive number"
    elif name == "score_temperatures":
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and k.isascii() and k.isdigit() and k == str(int(k)) and _positive(v)
            for k, v in value.items()
        )
        expected = 'an object of positive numbers keyed by numbers of labels re-ranked, e.g. {"0": 2.5}'
    elif name == "sentence_lengths":
        ok = isinstance(value, dict) and all(isinstance(k, str) and _positive_int(v) for k, v in value.items())
        expected = 'an object of positive integers keyed by cell type, e.g. {"B cell": 180}'
    elif name == "upper_case":
        ok, expected = isinstance(value, bool), "true or false"
    else:
        ok, expected = isinstance(value, str), "a string"
    return None if ok else f"{expected}{' or null' if name in _NULLABLE else ''}"


def _positive_int(value: Any) -> bool:
    """Whether `value` is a positive integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive(value: Any) -> bool:
    """Whether `value` is a positive finite number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    msg = f"Cannot write {type(o).__name__} to JSON"
    raise TypeError(msg)
