"""The one progress-bar rule: bars show unless :attr:`scanpy.settings.verbosity` is ``0`` (errors only).

Inference, training and downloads all follow it, so ``sc.settings.verbosity = 0`` (or ``sc-c2s --quiet``)
silences every bar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scanpy import settings

if TYPE_CHECKING:
    from tqdm.auto import tqdm


def show_progress() -> bool:
    """Whether progress bars show at the current verbosity."""
    return settings.verbosity > 0


def progress(*, total: int, desc: str | None, unit: str) -> tqdm:
    """Make a progress bar over `total` steps, hidden when :func:`show_progress` says so or `desc` is ``None``.

    ``desc=None`` is for work within another bar's step (held-out scoring during training).
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=desc is None or not show_progress())
