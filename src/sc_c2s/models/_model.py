"""The object :func:`sc_c2s.models.load` returns: a model, its tokenizer and its C2S metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sc_c2s._compat import portable_tokenizer_config

from ._files import SAVING_FILE
from ._lora import is_adapted, save_adapter
from ._metadata import C2SMetadata
from ._runtime import model_device, no_transformers_bars

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class C2SModel:
    """A loaded C2S checkpoint.

    Pass it as ``model=`` to any verb of ``sc_c2s.tl`` that runs a model (:func:`~sc_c2s.tl.annotate`,
    :func:`~sc_c2s.tl.generate`, :func:`~sc_c2s.tl.embed`, …).
    """

    model: PreTrainedModel
    """The causal language model, in eval mode on :attr:`device`."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer, padding on the left."""
    metadata: C2SMetadata
    """Prompt style, organism, vocabulary, labels, rank fit, training and scores."""
    path: Path
    """Directory the files were loaded from."""
    revision: str | None = None
    """Hugging Face revision of a registry model."""
    sha256: dict[str, str] = field(default_factory=dict)
    """Hash of each file of the checkpoint."""

    @property
    def name(self) -> str:
        """Registry name or directory name."""
        return self.metadata.name or self.path.name

    @property
    def device(self) -> torch.device:
        """Device the model lives on."""
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the weights."""
        return next(self.model.parameters()).dtype

    def save(self, directory: str | Path) -> Path:
        """Write the checkpoint into `directory`, for :func:`~sc_c2s.models.load` to open again.

        The weights (safetensors), the tokenizer and ``c2s_metadata.json`` go into `directory`, which is created
        if needed. A model with a LoRA adapter writes the adapter's weights only, beside the metadata that names
        its base model. :func:`sc_c2s.tl.finetune` saves its models this way. Until the last file is written,
        `directory` holds a file ``.c2s_saving``: :func:`~sc_c2s.models.load` refuses a directory whose save
        stopped half-way (a full disk, a killed process) rather than open its partly written files.

        Parameters
        ----------
        directory
            Where to write the files.

        Returns
        -------
        The directory.

        Raises
        ------
        TypeError, ValueError
            If the metadata could not be read back (see :meth:`C2SMetadata.to_json`); nothing is written then.
        """
        self.metadata.to_json()  # metadata that cannot be read back is refused before any file is written
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        saving = directory / SAVING_FILE
        saving.touch()
        with no_transformers_bars():
            if is_adapted(self.model):
                save_adapter(self.model, directory)
            else:
                self.model.save_pretrained(directory)
                self.tokenizer.save_pretrained(directory)
        portable_tokenizer_config(directory)
        self.metadata.write(directory)
        saving.unlink(missing_ok=True)  # another save into `directory` that finished first took it
        return directory

    def provenance(self) -> dict[str, Any]:
        """Name, revision, path and file hashes (also of an adapter's base model), for ``uns[key]["params"]``."""
        record = {"model": self.name, "path": str(self.path), "sha256": dict(self.sha256)}
        if self.revision is not None:
            record["revision"] = self.revision
        if self.metadata.adapter is not None:
            record["base_model"] = dict(self.metadata.adapter["base"])
        return record

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        labels = f", {len(self.metadata.labels)} labels" if self.metadata.labels else ""
        return (
            f"C2SModel({self.name!r}: {type(self.model).__name__}, {n_params / 1e6:.1f}M parameters on "
            f"{self.device} ({str(self.dtype).removeprefix('torch.')}), {self.metadata.organism}{labels})"
        )
