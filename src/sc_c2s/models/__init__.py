"""Checkpoints: the registry of published C2S models, downloading, loading and their metadata.

:func:`available` lists the checkpoints that open by name, :func:`fetch` downloads one into the cache (checked
by sha256), :func:`load` opens a name, the bundled ``"demo"`` model or a directory, and :func:`resolve` is what
every ``model=`` argument of :mod:`sc_c2s.tl` goes through. A checkpoint directory with a missing or unreadable
file raises :class:`BrokenCheckpointError`, which names the file.
"""

from __future__ import annotations

from ._download import fetch
from ._files import BrokenCheckpointError
from ._load import load, resolve
from ._metadata import C2SMetadata
from ._model import C2SModel
from ._registry import available

__all__ = ["BrokenCheckpointError", "C2SMetadata", "C2SModel", "available", "fetch", "load", "resolve"]
