"""Opening a checkpoint (registry name, bundled demo or directory) on a device, in a dtype, with its metadata."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pooch
from scanpy import logging as logg

from . import _download, _files, _registry, _runtime
from ._metadata import METADATA_FILE, C2SMetadata
from ._model import C2SModel

if TYPE_CHECKING:
    import torch

#: Files of a checkpoint directory that `load` hashes: configuration, weights and tokenizer (not optimizer states).
_CHECKPOINT_SUFFIXES = frozenset({".json", ".safetensors", ".bin", ".model", ".txt"})


def load(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> C2SModel:
    """Open a C2S checkpoint: the model, its tokenizer and its C2S metadata.

    Parameters
    ----------
    name_or_path
        A name from :func:`~sc_c2s.models.available` (downloaded on first use by
        :func:`~sc_c2s.models.fetch`), ``"demo"`` for the small model bundled with the package, or the path of
        a checkpoint directory: one written by :func:`sc_c2s.tl.finetune` (with ``c2s_metadata.json``) or a
        Hugging Face download of a published checkpoint. Registry names take precedence over paths; pass a
        :class:`~pathlib.Path` or a path with a separator to open a directory that has such a name.
    revision
        Revision of a registry checkpoint; ``None`` takes the registry's pinned one. Not for directories.
    device
        Torch device; ``None`` picks CUDA if available, else the CPU (never MPS unless asked for).
    dtype
        Floating-point type of the weights, as a :class:`torch.dtype` or its name (``"bfloat16"``); ``None``
        picks bfloat16 on CUDA (float16 where the GPU lacks bfloat16) and float32 elsewhere.

    Returns
    -------
    The loaded model, in eval mode on `device`, with its tokenizer padding on the left (the end-of-sequence
    token pads when the tokenizer has no padding token), its metadata, its revision and the sha256 of each
    file. Metadata come from the checkpoint's ``c2s_metadata.json``, else from the registry for a published
    checkpoint, else are the defaults of :class:`~sc_c2s.models.C2SMetadata`. Code shipped with a checkpoint
    is never run.

    Raises
    ------
    ValueError
        If `name_or_path` is neither a registry name nor a directory; if the checkpoint lacks config.json, its
        weights or its tokenizer, or holds a file that cannot be read (the message names the file and, for a
        download in the cache, how to fetch it again); if torch cannot use `device` (e.g. ``"cuda"`` without
        CUDA); or if `dtype` is not a floating-point type.

    Examples
    --------
    >>> import sc_c2s
    >>> model = sc_c2s.models.load("demo")  # doctest: +SKIP
    >>> model.provenance()  # doctest: +SKIP
    {'model': 'demo', 'path': '…/sc_c2s/models/demo', 'sha256': {'config.json': '…', …}}
    >>> model = sc_c2s.models.load("C2S-Pythia-410m-cell-type-prediction", device="cuda")  # doctest: +SKIP
    >>> model = sc_c2s.models.load("path/to/finetuned", dtype="float32")  # doctest: +SKIP
    """
    if not isinstance(name_or_path, str | os.PathLike):
        msg = (
            "`name_or_path` must be a name from `sc_c2s.models.available()`, 'demo' or a checkpoint directory, "
            f"got a {type(name_or_path).__name__}."
        )
        raise TypeError(msg)
    entry = _registry.lookup(name_or_path) if isinstance(name_or_path, str) else None
    if entry is not None:
        revision = revision or entry.revision
        path = _download.fetch(entry.name, revision=revision)
        sha256 = _download.recorded_hashes(path)
        return _open(path, metadata=entry.metadata(), revision=revision, sha256=sha256, device=device, dtype=dtype)
    if revision is not None:
        msg = f"`revision` selects a revision of a registry checkpoint; {str(name_or_path)!r} is not one."
        raise ValueError(msg)
    if name_or_path == _registry.DEMO:
        path = _registry.demo_dir()
        if not path.is_dir():
            msg = (
                f"The demo checkpoint is missing from this installation of sc_c2s (expected at {path}). Reinstall "
                "sc_c2s, or load a name from `sc_c2s.models.available()` or a checkpoint directory."
            )
            raise FileNotFoundError(msg)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            msg = (
                f"{str(name_or_path)!r} is neither a checkpoint directory nor a name from "
                f"`sc_c2s.models.available()`: {', '.join(map(repr, _registry.names()))}."
            )
            raise ValueError(msg)
    return _open(path, metadata=_metadata(path), revision=None, sha256=_hash_files(path), device=device, dtype=dtype)


def resolve(model: C2SModel | str | os.PathLike[str], *, device: str | torch.device | None = None) -> C2SModel:
    """Turn a `model=` argument into a loaded model: the helper every tool of :mod:`sc_c2s.tl` uses.

    Parameters
    ----------
    model
        A model from :func:`load`, or anything :func:`load` accepts.
    device
        Torch device. A loaded model is moved there in place (keeping its dtype); ``None`` leaves it where it
        is, and loads anything else on the default device of :func:`load`.

    Returns
    -------
    The loaded model.

    Examples
    --------
    >>> import sc_c2s
    >>> model = sc_c2s.models.resolve("demo")  # doctest: +SKIP
    >>> sc_c2s.models.resolve(model) is model  # doctest: +SKIP
    True
    """
    if isinstance(model, C2SModel):
        if device is not None:
            model.model.to(_runtime.check_device(device))
        return model
    return load(model, device=device)


def _open(
    path: Path,
    *,
    metadata: C2SMetadata,
    revision: str | None,
    sha256: dict[str, str],
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
) -> C2SModel:
    device, dtype = _runtime.device_and_dtype(device, dtype)
    start = logg.info(f"loading {metadata.name or path.name} on {device} in {str(dtype).removeprefix('torch.')}")
    try:
        tokenizer, model = _runtime.from_pretrained(path, dtype=dtype)
    except Exception as e:  # re-raised as it is unless a file of the checkpoint is found broken
        problem = _files.diagnose(path)
        if problem is None:
            raise
        raise _files.BrokenCheckpointError(problem) from e
    _runtime.prepare_tokenizer(tokenizer, model, path)
    model.to(device).eval()
    logg.info("    finished", time=start)
    return C2SModel(model=model, tokenizer=tokenizer, metadata=metadata, path=path, revision=revision, sha256=sha256)


def _metadata(path: Path) -> C2SMetadata:
    """Metadata of a checkpoint directory: its own file, else the registry's, else defaults (with a warning).

    A directory that lacks the files every checkpoint has, or whose metadata file cannot be read, is refused.
    """
    _files.check_complete(path)
    if (path / METADATA_FILE).is_file():
        try:
            return C2SMetadata.read(path)
        except (ValueError, TypeError, AttributeError) as e:
            why = f"cannot be read as C2S metadata ({e})"
            raise _files.BrokenCheckpointError(_files.broken_message(path / METADATA_FILE, why)) from e
    entry = _registry.match(path)
    if entry is not None:
        return entry.metadata()
    logg.warning(
        f"{path} has no {METADATA_FILE} and is not a published checkpoint: prompting it with the defaults of "
        "C2SMetadata (published prompt format, Homo sapiens, 200 genes)."
    )
    return C2SMetadata(name=path.name)


def _hash_files(path: Path) -> dict[str, str]:
    """sha256 of the configuration, weight and tokenizer files of a checkpoint directory."""
    return {
        p.name: pooch.file_hash(str(p))
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES and p.name != _download.HASHES_FILE
    }
