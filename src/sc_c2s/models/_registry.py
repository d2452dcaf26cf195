"""The registry of published C2S checkpoints, and the demo checkpoint bundled with the package.

Facts come from the Hugging Face model cards and file listings of each repository. What could not be confirmed
there (the machines that wrote this cannot reach Hugging Face) is named in each entry's ``unconfirmed``; the
comment above an entry says where its values come from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._metadata import METADATA_FILE, TASKS, C2SMetadata

if TYPE_CHECKING:
    import pandas as pd

#: Name of the checkpoint bundled with the package.
DEMO = "demo"

PREDICTION, GENERATION = TASKS
#: A causal LM saved in one safetensors file with a GPT-NeoX tokenizer, as the Pythia checkpoints are.
_PYTHIA_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
#: Sharded weights (the shards are read from the index) and a SentencePiece tokenizer, as Gemma 2 is saved.
_GEMMA_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class RegistryEntry:
    """A published checkpoint: where its files are, what it was trained for and how to prompt it."""

    name: str
    """Name used by :func:`~sc_c2s.models.load`: the repository name without its owner."""
    repo: str
    """Hugging Face repository."""
    revision: str
    """Commit the files are pinned to, or ``"main"`` where no commit could be confirmed."""
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

    def metadata(self) -> C2SMetadata:
        """C2S metadata for this checkpoint, as a ``c2s_metadata.json`` would give it."""
        metadata = C2SMetadata(
            name=self.name,
            prompt_style=self.prompt_style,
            tasks=list(self.tasks),
            organism=self.organism,
            training={"base_model": self.base_model, "repo": self.repo, "description": self.description},
        )
        if self.n_genes is not None:
            metadata.n_genes = self.n_genes
        return metadata


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in [
        # Card and file listing read at the pinned commit (the latest seen); the first card said CC BY-NC-ND 4.0,
        # later cards have no license field and a mirror of the newest one calls the weights CC0 1.0.
        RegistryEntry(
            name="C2S-Pythia-410m-cell-type-prediction",
            repo="vandijklab/C2S-Pythia-410m-cell-type-prediction",
            revision="2fdb88c32a06d27e0680517f1531133528544abe",
            files=_PYTHIA_FILES,
            size_gb=1.62,
            architecture="GPTNeoXForCausalLM",
            base_model="EleutherAI/pythia-410m",
            tasks=(PREDICTION,),
            prompt_style="c2s",
            n_genes=200,
            context_length=8192,
            license="CC-BY-NC-ND-4.0",
            description="Cell type prediction; 57M human and mouse cells from CELLxGENE and the Human Cell Atlas.",
            unconfirmed=("context_length", "license"),
        ),
        # Card and file listing read on main; its full commit hash could not be read (short hash 5568661).
        RegistryEntry(
            name="C2S-Pythia-410m-cell-type-conditioned-cell-generation",
            repo="vandijklab/C2S-Pythia-410m-cell-type-conditioned-cell-generation",
            revision="main",
            files=_PYTHIA_FILES,
            size_gb=1.62,
            architecture="GPTNeoXForCausalLM",
            base_model="EleutherAI/pythia-410m",
            tasks=(GENERATION,),
            prompt_style="c2s",
            n_genes=200,
            context_length=2048,
            license="CC-BY-NC-ND-4.0",
            description="Cell generation conditioned on cell type; same training cells as the prediction model.",
            unconfirmed=("revision", "context_length"),
        ),
        # Card and file listing read on main (short hash a95e6b5); the card gives the 8192-token context.
        RegistryEntry(
            name="C2S-Pythia-410m-diverse-single-and-multi-cell-tasks",
            repo="vandijklab/C2S-Pythia-410m-diverse-single-and-multi-cell-tasks",
            revision="main",
            files=_PYTHIA_FILES,
            size_gb=1.62,
            architecture="GPTNeoXForCausalLM",
            base_model="EleutherAI/pythia-410m",
            tasks=TASKS,
            prompt_style="c2s",
            n_genes=None,
            context_length=8192,
            license="CC-BY-NC-ND-4.0",
            description=(
                "Single- and multi-cell tasks (generation, cell type and tissue prediction, …) on sentences of "
                "100–2048 genes."
            ),
            unconfirmed=("revision",),
        ),
        # Card and file listing read at the pinned commit. The first C2S release: trained on whole sentences of
        # immune cells (Domínguez Conde et al. 2022) with the prompts of the cell2sentence-ft code, not those of
        # sc_c2s.prompts.
        RegistryEntry(
            name="pythia-160m-c2s",
            repo="vandijklab/pythia-160m-c2s",
            revision="bfb8e56218a29a7a412bbd4db450a326a20beb49",
            files=_PYTHIA_FILES,
            size_gb=0.65,
            architecture="GPTNeoXForCausalLM",
            base_model="EleutherAI/pythia-160m",
            tasks=TASKS,
            prompt_style="c2s-legacy",
            n_genes=None,
            context_length=2048,
            license="CC-BY-NC-ND-4.0",
            description="Legacy: the first C2S model, immune tissue, conditional and unconditional generation.",
            unconfirmed=("context_length",),
        ),
        # The commit is the one other projects pin; files and size assume the Pythia layout in float32.
        RegistryEntry(
            name="C2S-Scale-Pythia-1b-pt",
            repo="vandijklab/C2S-Scale-Pythia-1b-pt",
            revision="830e4689d4238bbb5e2ec9a89b76e6a6d48061db",
            files=_PYTHIA_FILES,
            size_gb=4.05,
            architecture="GPTNeoXForCausalLM",
            base_model="EleutherAI/pythia-1b",
            tasks=TASKS,
            prompt_style="c2s",
            n_genes=200,
            context_length=8192,
            license=None,
            description="C2S-Scale pretrained Pythia-1b: cell sentences and biological text, many tasks.",
            unconfirmed=("revision", "files", "size_gb", "tasks", "n_genes", "context_length", "license"),
        ),
        # The commit and the file set (two shards, a SentencePiece tokenizer, ~5.2 GB) are those other projects
        # pin; the context length is Gemma 2's.
        RegistryEntry(
            name="C2S-Scale-Gemma-2-2B",
            repo="vandijklab/C2S-Scale-Gemma-2-2B",
            revision="5ddf28b8f1c81b7ab7a9be192924da82b6c5d512",
            files=_GEMMA_FILES,
            size_gb=5.2,
            architecture="Gemma2ForCausalLM",
            base_model="google/gemma-2-2b",
            tasks=TASKS,
            prompt_style="c2s",
            n_genes=200,
            context_length=8192,
            license=None,
            description="C2S-Scale Gemma 2 2B: cell sentences and biological text, many tasks.",
            unconfirmed=("revision", "files", "tasks", "n_genes", "license"),
        ),
        # Revision pinned by DESIGN; the prediction prompt of sc_c2s.prompts is the one its published examples
        # use, with at least 200 genes. Files and size (bfloat16) assume the layout of the 2B model.
        RegistryEntry(
            name="C2S-Scale-Gemma-2-27B",
            repo="vandijklab/C2S-Scale-Gemma-2-27B",
            revision="44c2ff7dd5edc26daf9c3f4106e18e162a55676a",
            files=_GEMMA_FILES,
            size_gb=54.5,
            architecture="Gemma2ForCausalLM",
            base_model="google/gemma-2-27b",
            tasks=TASKS,
            prompt_style="c2s",
            n_genes=200,
            context_length=8192,
            license=None,
            description="C2S-Scale Gemma 2 27B: cell sentences and biological text, many tasks; needs ~64 GB GPU.",
            unconfirmed=("files", "size_gb", "tasks", "license"),
        ),
    ]
}


def names() -> list[str]:
    """Every name :func:`~sc_c2s.models.load` accepts besides a path."""
    return [*REGISTRY, DEMO]


def lookup(name: str) -> RegistryEntry | None:
    """Find the entry called `name`, or whose repository is `name`."""
    return REGISTRY.get(name) or next((e for e in REGISTRY.values() if e.repo == name), None)


def get(name: str) -> RegistryEntry:
    """Get the entry called `name`, or raise an error that lists the names there are."""
    entry = lookup(name)
    if entry is None:
        msg = f"No checkpoint called {name!r}. Available: {', '.join(map(repr, names()))}."
        raise ValueError(msg)
    return entry


def match(path: Path) -> RegistryEntry | None:
    """Find the entry a downloaded checkpoint directory belongs to, judged by its path.

    Recognises a directory named after the checkpoint (also the layout of the sc_c2s cache) and the
    ``models--{owner}--{name}`` folders of the Hugging Face cache.
    """
    parts = set(path.resolve().parts)
    return next(
        (e for e in REGISTRY.values() if e.name in parts or "models--" + e.repo.replace("/", "--") in parts), None
    )


def demo_dir() -> Path:
    """Directory of the checkpoint bundled with the package (which may not have been built)."""
    return Path(str(resources.files(__package__) / DEMO))


def available() -> pd.DataFrame:
    """Checkpoints that :func:`~sc_c2s.models.load` opens by name.

    One row per published C2S checkpoint and one for the bundled ``"demo"`` model. Files are downloaded into
    the cache of :func:`~sc_c2s.models.fetch` on first use; values that could not be confirmed from the model
    cards are named in ``unconfirmed``.

    Returns
    -------
    A data frame indexed by name, with columns ``repo``, ``revision``, ``files``, ``size_gb``, ``architecture``,
    ``base_model``, ``tasks``, ``prompt_style``, ``n_genes``, ``context_length``, ``organism``, ``license``,
    ``sha256`` (known hashes; files without one are trusted on first download), ``unconfirmed`` and
    ``description``.

    Examples
    --------
    >>> import sc_c2s
    >>> zoo = sc_c2s.models.available()
    >>> zoo.loc["C2S-Scale-Gemma-2-27B", "revision"]
    '44c2ff7dd5edc26daf9c3f4106e18e162a55676a'
    >>> zoo.loc[zoo["tasks"].map(lambda t: "cell_type_prediction" in t)].index[0]
    'C2S-Pythia-410m-cell-type-prediction'
    """
    import pandas as pd

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
        }
        for e in REGISTRY.values()
    ]
    rows.append(_demo_row(demo_dir()))
    return pd.DataFrame(rows).set_index("name").astype({"n_genes": "Int64", "context_length": "Int64"})


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
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
