"""The files of a checkpoint directory, checked one by one, so that a broken checkpoint is named file by file.

transformers and safetensors report a missing or damaged file in their own terms (a tokenizer backend that cannot
be built, a header that is too small). :func:`check_complete` refuses a directory without the files every
checkpoint has before they read it, and :func:`diagnose` finds the file that made them fail, with what to do
about it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import _download, _registry
from ._lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ._metadata import METADATA_FILE

#: Files that hold the weights; any one of them makes a checkpoint's weights.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: The SentencePiece model of a tokenizer (as Gemma checkpoints have).
SENTENCEPIECE_FILE = "tokenizer.model"
#: Files a tokenizer is built from; any one of them makes a checkpoint's tokenizer.
TOKENIZER_FILES = ("tokenizer.json", SENTENCEPIECE_FILE, "vocab.json", "vocab.txt", "spiece.model")
#: JSON files of a checkpoint that must parse.
_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    METADATA_FILE,
)


#: Written first and removed last by :meth:`~sc_c2s.models.C2SModel.save`: a directory that holds it is a save that
#: did not finish (a full disk, a stopped process), whose files may be partly written.
SAVING_FILE = ".c2s_saving"


class BrokenCheckpointError(ValueError):
    """A checkpoint directory is incomplete, holds a file that cannot be read, or was not saved to the end.

    Incomplete: it lacks a file every checkpoint has. Not saved to the end: it holds ``.c2s_saving``, which a save
    that stopped half-way left.
    """


def check_saved(path: Path) -> None:
    """Raise :class:`BrokenCheckpointError` if a save into `path` did not finish (it holds :data:`SAVING_FILE`)."""
    if (path / SAVING_FILE).exists():
        msg = (
            f"The checkpoint at {path} was not saved to the end: a save into it stopped (a full disk, a stopped or "
            f"killed process) and left {SAVING_FILE}, so its files may be partly written. Save or train the model "
            "again, or load another one."
        )
        raise BrokenCheckpointError(msg)


def check_complete(path: Path) -> None:
    """Raise :class:`BrokenCheckpointError` if `path` lacks ``config.json``, weights or tokenizer files."""
    problem = _missing(path)
    if problem is not None:
        raise BrokenCheckpointError(problem)


@contextmanager
def diagnosed(path: Path) -> Iterator[None]:
    """Read the checkpoint at `path` in the block; a failure caused by a broken file becomes a clear error.

    An error in the block is re-raised as it is unless :func:`diagnose` finds a broken file, which is then named
    in a :class:`BrokenCheckpointError`.
    """
    try:
        yield
    except Exception as e:
        problem = diagnose(path)
        if problem is None:
            raise
        raise BrokenCheckpointError(problem) from e


def diagnose(path: Path) -> str | None:
    """Say which file of the checkpoint at `path` is missing or cannot be read, and what to do; ``None`` if none.

    Checks that the files every checkpoint has are there, that its JSON files parse, that each safetensors
    file is as long as its header says and that a SentencePiece model reads.
    """
    missing = _missing(path)
    if missing is not None:
        return missing
    json_files = [*(path / name for name in _JSON_FILES), *sorted(path.glob("*.index.json"))]
    for file in [*json_files, *sorted(path.glob("*.safetensors")), path / SENTENCEPIECE_FILE]:
        why = file_problem(file) if file.is_file() else None
        if why is not None:
            return broken_message(file, why)
    return None


def diagnose_adapter(path: Path) -> str | None:
    """Say which file of the LoRA adapter at `path` is missing or cannot be read, and what to do; ``None`` if none."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE):
        file = path / name
        if not file.is_file():
            return f"The adapter at {path} is incomplete: it has no {name}. {_fix(path)}"
        why = file_problem(file)
        if why is not None:
            return broken_message(file, why)
    return None


def file_problem(file: Path) -> str | None:
    """Why a JSON, safetensors or SentencePiece file cannot be read, or ``None`` (other files are not checked)."""
    if file.suffix == ".json":
        try:
            content = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return f"is not valid JSON ({e})"
        if file.name == "tokenizer.json" and not (isinstance(content, dict) and "model" in content):
            return "is not a tokenizer: it has no `model` field (the vocabulary and how words split into tokens)"
    elif file.suffix == ".safetensors":
        return _safetensors_problem(file)
    elif file.name == SENTENCEPIECE_FILE:
        return _sentencepiece_problem(file)
    return None


def _sentencepiece_problem(file: Path) -> str | None:
    """Why a SentencePiece model cannot be read, or ``None`` (also without sentencepiece, which loading asks for)."""
    try:
        import sentencepiece
    except ImportError:
        return None
    try:
        n_pieces = sentencepiece.SentencePieceProcessor(model_proto=file.read_bytes()).get_piece_size()
    except RuntimeError:  # not a model: sentencepiece names no more than its parser
        n_pieces = 0
    return None if n_pieces else "is not a SentencePiece model"


def _missing(path: Path) -> str | None:
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if "config.json" not in names:
        what = "config.json (the model's configuration)"
    elif not names.intersection(WEIGHT_FILES):
        what = f"weights (one of {', '.join(WEIGHT_FILES)})"
    elif not names.intersection(TOKENIZER_FILES):
        what = f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})"
    else:
        return None
    listing = ", ".join(sorted(names)[:10]) + (", …" if len(names) > 10 else "") if names else "none"
    return (
        f"The checkpoint at {path} is incomplete: it has no {what} (files there: {listing}). A checkpoint "
        f"directory holds config.json, the weights and the tokenizer files. {_fix(path)}"
    )


def _safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be read (its size does not match its header), or ``None``."""
    size = file.stat().st_size
    if size < 8:
        return f"is truncated: it has {size} bytes, fewer than the 8 of a safetensors header's length"
    with file.open("rb") as f:
        (n_header,) = struct.unpack("<Q", f.read(8))
        if 8 + n_header > size:
            return f"is truncated: it has {size} bytes, but its header alone says {8 + n_header}"
        try:
            header = json.loads(f.read(n_header))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a damaged header (not the JSON table of tensors a safetensors file starts with)"
    if 8 + n_header + end != size:
        expected = 8 + n_header + end
        return f"is {'truncated' if size < expected else 'too long'}: it has {size} bytes, its header says {expected}"
    return None


def broken_message(file: Path, why: str) -> str:
    """Name a file of a checkpoint that cannot be read, say why, and what to do about it."""
    return f"{file.name} of the checkpoint at {file.parent} {why}. {_fix(file.parent, file)}"


def _fix(path: Path, file: Path | None = None) -> str:
    """Say what to do about a broken checkpoint: fetch a cached download again, reinstall the demo, or copy it."""
    if path.resolve() == _registry.demo_dir().resolve():
        return "The demo checkpoint of this installation is damaged; reinstall sc_c2s."
    cache = _download.cache_dir().resolve()
    if path.resolve().is_relative_to(cache):
        relative = path.resolve().relative_to(cache).as_posix()
        # the folders below the repository's name the revision, which may hold "/" ("refs/pr/1")
        entry = next((e for e in _registry.REGISTRY.values() if relative.startswith(f"{e.repo}/")), None)
        if entry is None:
            name, _, revision = relative.rpartition("/")
        else:
            name, revision = entry.name, relative.removeprefix(f"{entry.repo}/")
        target = f"'{file}' '{path / _download.HASHES_FILE}'" if file is not None else f"-r '{path}'"
        return (
            f"It is a download in the cache of sc_c2s; delete it and fetch it again: `rm {target}`, then "
            f"`sc_c2s.models.fetch({name!r}, revision={revision!r})` (or `sc-c2s models fetch {name} --revision "
            f"{revision}`)."
        )
    return "Copy or save the checkpoint there again (e.g. with `model.save(path)`), or load another one."
