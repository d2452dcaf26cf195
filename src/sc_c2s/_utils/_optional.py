"""Optional dependencies: imported where they are needed, with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingPackageError(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def import_optional(module: str, *, extra: str | None, purpose: str, install: str | None = None) -> ModuleType:
    """Import `module`, or raise a :class:`MissingPackageError` naming the extra of sc-c2s (or the command) to install.

    Examples
    --------
    >>> import_optional("json", extra="lora", purpose="Reading JSON").__name__
    'json'
    >>> try:
    ...     import_optional("no_such_module", extra="lora", purpose="LoRA fine-tuning")
    ... except MissingPackageError as error:
    ...     print(error)
    LoRA fine-tuning needs the `no_such_module` package: `pip install "sc-c2s[lora]"`.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        command = install or f'pip install "sc-c2s[{extra}]"'
        msg = f"{purpose} needs the `{module}` package: `{command}`."
        raise MissingPackageError(msg) from error
