"""The registry of published C2S checkpoints, and the demo checkpoint bundled with the package.

The entries are data: ``registry.json`` beside this module, read once on first use. Facts come from the Hugging
Face model cards and file listings of each repository, or from public projects that pin them; each entry's
``source`` says which. What could not be confirmed is named in its ``unconfirmed``.
``scripts/update_registry.py`` resolves revisions to commits and records file hashes where Hugging Face is
reachable.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._metadata import METADATA_FILE, C2SMetadata

if TYPE_CHECKING:
    import pandas as pd

#: Name of the checkpoint bundled with the package.
DEMO = "demo"
#: The data file of the registry, in this package.
REGISTRY_FILE = "registry.json"


@dataclass(frozen=True)
class RegistryEntry:
    """A published checkpoint: where its files are, what it was trained for and how to prompt it."""

    name: str
    """Name used by :func:`~sc_c2s.models.load`: the repository name without its owner."""
    repo: str
    """Hugging Face repository."""
    revision: str
    """Commit the files are pinned to, or a branch where no commit could be confirmed."""
    files: tuple[str, ...]
    """Files to download; the shards named in a ``*.index.json`` are downloaded with it."""
    size_gb: float
    """Approximate download size in GB."""
    architecture: str
    """transformers model class."""
    base_model: str
    """Model the checkpoint was fine-tuned from."""
    tasks: tuple[str, ...]
    """Tasks of :data:`sc_c2s.models._metadata.TASKS` the checkpoint was trained for."""
    prompt_style: str
    """``"c2s"``: the prompts of :mod:`sc_c2s.prompts`; ``"c2s-legacy"``: the first C2S release's prompts."""
    n_genes: int | None
    """Genes per training sentence (``None``: varied, or whole sentences)."""
    context_length: int
    """Maximum tokens of prompt and answer."""
    license: str | None
    """License of the weights (``None``: not stated where it could be read)."""
    description: str
    """What the checkpoint is."""
    organism: str = "Homo sapiens"
    """Organism named in prompts by default (the Pythia-410m and C2S-Scale models also saw mouse cells)."""
    sha256: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Known hash of each file; files without one are trusted on first download."""
    unconfirmed: tuple[str, ...] = ()
    """Fields whose value could not be confirmed."""
    source: str = ""
    """Where the values come from."""

    def metadata(self) -> C2SMetadata:
        """C2S metadata for this checkpoint, as a ``c2s_metadata.json`` would give it."""
        metadata = C2SMetadata(
            name=self.name,
            prompt_style=self.prompt_style,
            tasks=list(self.tasks),
            organism=self.organism,
            answer_prefix=None,
            training={"base_model": self.base_model, "repo": self.repo, "description": self.description},
        )
        if self.n_genes is not None:
            metadata.n_genes = self.n_genes
        return metadata


@functools.cache
def registry() -> dict[str, RegistryEntry]:
    """Every published checkpoint by name, in the order of ``registry.json`` (read once, then cached)."""
    text = resources.files(__package__).joinpath(REGISTRY_FILE).read_text(encoding="utf-8")
    return {entry.name: entry for entry in map(_entry, json.loads(text)["checkpoints"])}


def _entry(data: dict[str, Any]) -> RegistryEntry:
    """Make an entry from its JSON object, refusing unknown or missing fields."""
    known = {f.name for f in fields(RegistryEntry)}
    unknown, missing = set(data) - known, known - set(data)
    if unknown or missing or not set(data.get("unconfirmed", ())) <= known:
        msg = (
            f"Entry {data.get('name')!r} of {REGISTRY_FILE} does not match sc_c2s.models._registry.RegistryEntry: "
            f"unknown fields {sorted(unknown)}, missing fields {sorted(missing)}, unconfirmed "
            f"{sorted(data.get('unconfirmed', []))}. Fix the file, or rewrite it with scripts/update_registry.py."
        )
        raise ValueError(msg)
    tuples = {key: tuple(data[key]) for key in ("files", "tasks", "unconfirmed")}
    return RegistryEntry(**{**data, **tuples, "sha256": MappingProxyType(dict(data["sha256"]))})


def __getattr__(name: str) -> Any:
    # `REGISTRY` is read on first use, so that importing sc_c2s does not read the file
    if name == "REGISTRY":
        return registry()
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def names() -> list[str]:
    """Every name :func:`~sc_c2s.models.load` accepts besides a path."""
    return [*registry(), DEMO]


def lookup(name: str) -> RegistryEntry | None:
    """Find the entry called `name`, or whose repository is `name`."""
    entries = registry()
    return entries.get(name) or next((e for e in entries.values() if e.repo == name), None)


def get(name: str) -> RegistryEntry:
    """Get the entry called `name`, or raise an error that lists the names there are to download."""
    entry = lookup(name)
    if entry is None:
        msg = (
            f"No checkpoint called {name!r}. Available: {', '.join(map(repr, registry()))} ({DEMO!r} comes with "
            f"the package, without a download: open it with `load({DEMO!r})`)."
        )
        raise ValueError(msg)
    return entry


def match(path: Path) -> RegistryEntry | None:
    """Find the entry a downloaded checkpoint directory belongs to, judged by its path.

    Recognises a directory named after the checkpoint or its repository (a ``git clone``), the
    ``{owner}/{name}/{revision}`` folders of the sc_c2s cache and the ``models--{owner}--{name}/snapshots/{commit}``
    folders of the Hugging Face cache; not a directory somewhere below one of these (a run saved inside it).
    """
    path = path.resolve()
    cached = "/".join(path.parts[-3:-1])
    hub = path.parent.parent.name if path.parent.name == "snapshots" else None
    return next(
        (
            e
            for e in registry().values()
            if path.name in {e.name, e.repo.rsplit("/", 1)[-1]}
            or cached == e.repo
            or hub == "models--" + e.repo.replace("/", "--")
        ),
        None,
    )


def demo_dir() -> Path:
    """Directory of the checkpoint bundled with the package (which may not have been built)."""
    return Path(str(resources.files(__package__) / DEMO))


def available() -> pd.DataFrame:
    """Checkpoints that :func:`~sc_c2s.models.load` opens by name.

    One row per published C2S checkpoint and one for the bundled ``"demo"`` model. Files are downloaded into
    the cache of :func:`~sc_c2s.models.fetch` on first use. ``source`` says where each row's values come from;
    values that could not be confirmed there are named in ``unconfirmed``.

    Returns
    -------
    A data frame indexed by name, with columns ``repo``, ``revision``, ``files``, ``size_gb``, ``architecture``,
    ``base_model``, ``tasks``, ``prompt_style``, ``n_genes``, ``context_length``, ``organism``, ``license``,
    ``sha256`` (known hashes; files without one are trusted on first download), ``unconfirmed``,
    ``description``, ``source``, and what the model needs: ``parameters`` (billions) and the memory in GiB
    (estimated from the architecture, with batches of 8 cells or samples of 1,024 tokens) for inference in
    bfloat16, 8-bit and 4-bit (``inference_bf16_gib``, ``inference_8bit_gib``, ``inference_4bit_gib``) and for
    LoRA fine-tuning on a bfloat16 or a 4-bit base (``lora_gib``, ``qlora_gib``). See :doc:`/large_models`.

    Examples
    --------
    >>> import sc_c2s
    >>> zoo = sc_c2s.models.available()
    >>> zoo.loc["C2S-Scale-Gemma-2-27B", "revision"]
    '44c2ff7dd5edc26daf9c3f4106e18e162a55676a'
    >>> zoo.loc[zoo["tasks"].map(lambda t: "cell_type_prediction" in t)].index[0]
    'C2S-Pythia-410m-cell-type-prediction'
    >>> [float(x) for x in zoo.loc["C2S-Scale-Gemma-2-27B", ["parameters", "inference_bf16_gib", "inference_4bit_gib"]]]
    [27.2, 57.6, 21.6]
    """
    import pandas as pd

    from . import _memory

    rows = [
        {
            "name": e.name,
            "repo": e.repo,
            "revision": e.revision,
            "files": e.files,
            "size_gb": e.size_gb,
            "architecture": e.architecture,
            "base_model": e.base_model,
            "tasks": e.tasks,
            "prompt_style": e.prompt_style,
            "n_genes": e.n_genes,
            "context_length": e.context_length,
            "organism": e.organism,
            "license": e.license,
            "sha256": dict(e.sha256),
            "unconfirmed": e.unconfirmed,
            "description": e.description,
            "source": e.source,
            **_needs(_memory.ARCHITECTURES.get(e.base_model)),
        }
        for e in registry().values()
    ]
    rows.append(_demo_row(demo_dir()))
    return pd.DataFrame(rows).set_index("name").astype({"n_genes": "Int64", "context_length": "Int64"})


def _needs(config: dict[str, Any] | None) -> dict[str, float | None]:
    """Parameters (billions) and memory (GiB) of a model with this configuration; ``None`` where unknown."""
    from . import _memory

    shape = _memory.shape(config) if config else None
    columns = ("inference_bf16", "inference_8bit", "inference_4bit", "lora_bf16", "qlora_4bit")
    names = ("inference_bf16_gib", "inference_8bit_gib", "inference_4bit_gib", "lora_gib", "qlora_gib")
    if shape is None:
        return {"parameters": None, **dict.fromkeys(names)}
    estimates = _memory.estimates(shape)
    return {"parameters": round(shape.n_parameters / 1e9, 3 if shape.n_parameters < 1e9 else 1)} | {
        name: estimates[column] for name, column in zip(names, columns, strict=True)
    }


def _demo_row(directory: Path) -> dict[str, Any]:
    """Describe the demo checkpoint for :func:`available`, from its files when they are there."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    config = _read_json(directory / "config.json")
    metadata = _read_json(directory / METADATA_FILE)
    return {
        "name": DEMO,
        "repo": None,
        "revision": None,
        "files": tuple(files),
        "size_gb": sum((directory / f).stat().st_size for f in files) / 1e9,
        "architecture": (config.get("architectures") or [None])[0],
        "base_model": metadata.get("training", {}).get("base_model"),
        "tasks": tuple(metadata.get("tasks", ())),
        "prompt_style": metadata.get("prompt_style"),
        "n_genes": metadata.get("n_genes"),
        "context_length": config.get("max_position_embeddings"),
        "organism": metadata.get("organism"),
        "license": "BSD-3-Clause",
        "sha256": {},
        "unconfirmed": (),
        "description": "Small model bundled with the package, for trying the workflow on a CPU"
        + ("." if files else " (not built in this installation)."),
        "source": "Trained from scratch on scanpy.datasets.pbmc68k_reduced() by scripts/train_demo_model.py.",
        **_needs(config),
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
