"""Checkpoints: the registry of published C2S models, downloading, loading and their metadata."""

from __future__ import annotations

__all__: list[str] = []
