"""Opening a checkpoint (registry name, bundled demo or directory) on a device, in a dtype, with its metadata."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from scanpy import logging as logg

from sc_c2s._utils._optional import import_optional
from sc_c2s._utils._validate import check_flag

from . import _download, _files, _lora, _memory, _registry, _runtime
from ._metadata import METADATA_FILE, C2SMetadata
from ._model import C2SModel

if TYPE_CHECKING:
    import torch

AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa", "flash_attention_2")

#: Files of a checkpoint directory that `load` hashes: configuration, weights and tokenizer (not optimizer states).
_CHECKPOINT_SUFFIXES = frozenset({".json", ".safetensors", ".bin", ".model", ".txt"})


def load(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantization: _memory.Quantization | None = None,
    attn_implementation: AttnImplementation | None = None,
    merge: bool = False,
) -> C2SModel:
    """Open a C2S checkpoint: the model, its tokenizer and its C2S metadata.

    Parameters
    ----------
    name_or_path
        A name from :func:`~sc_c2s.models.available` (downloaded on first use by
        :func:`~sc_c2s.models.fetch`), ``"demo"`` for the small model bundled with the package, or the path of
        a checkpoint directory: one written by :func:`sc_c2s.tl.finetune` (with ``c2s_metadata.json``) or a
        Hugging Face download of a published checkpoint. Registry names take precedence over paths; pass a
        :class:`~pathlib.Path` or a path with a separator to open a directory that has such a name. A LoRA
        adapter written by :func:`sc_c2s.tl.finetune` (``adapter="lora"``) loads its base model (from the
        registry and the download cache, or the directory it was trained from; its files must be those the
        adapter was trained on) and applies the adapter.
    revision
        Revision of a registry checkpoint; ``None`` takes the registry's pinned one. Not for directories.
    device
        Torch device; ``None`` picks CUDA if available, else the CPU (never MPS unless asked for).
    dtype
        Floating-point type of the weights, as a :class:`torch.dtype` or its name (``"bfloat16"``); ``None``
        picks bfloat16 on CUDA (float16 where the GPU lacks bfloat16, but float32 for Gemma models, whose
        activations overflow float16) and float32 elsewhere. With `quantization`, the type computations run in.
    quantization
        ``"8bit"`` (LLM.int8) or ``"4bit"`` (NF4 with double quantisation) loads the weights of the linear
        layers quantised, through bitsandbytes (``pip install "sc-c2s[quantization]"``), on a CUDA GPU only:
        the 27B Gemma-2 model then fits in about 22 GiB instead of 58 (see :doc:`/large_models`).
    attn_implementation
        Attention kernel: ``"sdpa"`` (PyTorch's scaled dot-product attention), ``"eager"``, or
        ``"flash_attention_2"`` (on a GPU, in bfloat16 or float16, with the ``flash-attn`` package). ``None`` lets
        transformers choose: SDPA where the model supports it, eager for Gemma 2, whose soft-capping of the
        attention logits SDPA cannot do.
    merge
        For an adapter: fold it into the base model's weights (faster inference; not with `quantization`). A
        whole model is loaded as it is, with a warning.

    Returns
    -------
    The loaded model, in eval mode on `device`, with its tokenizer padding on the left (the end-of-sequence
    token pads when the tokenizer has no padding token), its metadata, its revision and the sha256 of each
    file. Metadata come from the checkpoint's ``c2s_metadata.json``, else from the registry for a published
    checkpoint, else are the defaults of :class:`~sc_c2s.models.C2SMetadata`. Code shipped with a checkpoint
    is never run.

    Raises
    ------
    MemoryError
        Before downloading anything, when the device cannot hold the model even for one cell at a time (free
        GPU memory, or available system memory for the CPU). The message says what the model needs and what
        would fit; ``sc_c2s.models.available()`` lists the needs of every checkpoint.
    ValueError
        If `name_or_path` is neither a registry name nor a directory; if the checkpoint lacks config.json, its
        weights or its tokenizer, or holds a file that cannot be read (the message names the file and, for a
        download in the cache, how to fetch it again), or ``.c2s_saving``, left by a save that stopped half-way
        (:meth:`~sc_c2s.models.C2SModel.save`); if torch cannot use `device` (e.g. ``"cuda"`` without
        CUDA); if `dtype` is not a floating-point type; for `quantization` or FlashAttention-2 off a CUDA GPU,
        and for attention kernels the model does not support.
    ImportError
        When `quantization` needs bitsandbytes, `attn_implementation` flash-attn, or an adapter peft, and it is
        not installed.

    Examples
    --------
    >>> import sc_c2s
    >>> model = sc_c2s.models.load("demo")  # doctest: +SKIP
    >>> model.provenance()  # doctest: +SKIP
    {'model': 'demo', 'path': '…/sc_c2s/models/demo', 'sha256': {'config.json': '…', …}}
    >>> model = sc_c2s.models.load("C2S-Pythia-410m-cell-type-prediction", device="cuda")  # doctest: +SKIP
    >>> model = sc_c2s.models.load("path/to/finetuned", dtype="float32")  # doctest: +SKIP
    >>> model = sc_c2s.models.load("C2S-Scale-Gemma-2-27B", quantization="4bit")  # doctest: +SKIP
    >>> model = sc_c2s.models.load("path/to/lora_adapter", merge=True)  # doctest: +SKIP
    """
    if not isinstance(name_or_path, str | os.PathLike):
        msg = (
            "`name_or_path` must be a name from `sc_c2s.models.available()`, 'demo' or a checkpoint directory, "
            f"got a {type(name_or_path).__name__}."
        )
        raise TypeError(msg)
    options = _Options.check(device, dtype, quantization, attn_implementation, merge=merge)
    return _load(name_or_path, revision=revision, options=options)


def _load(
    name_or_path: str | os.PathLike[str], *, revision: str | None, options: _Options, adapter_base: bool = False
) -> C2SModel:
    """Load a checkpoint with checked `options`; `adapter_base`: as the base model of an adapter."""
    entry = _registry.lookup(name_or_path) if isinstance(name_or_path, str) else None
    if entry is not None:
        revision = revision or entry.revision
        options.check_fits(_memory.ARCHITECTURES.get(entry.base_model, {}), entry.name)  # before downloading
        _check_tokenizer_files(entry.files)
        path = _download.fetch(entry.name, revision=revision)
        sha256 = _download.recorded_hashes(path)
        return _open(path, metadata=entry.metadata(), revision=revision, sha256=sha256, options=options)
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
        check_name_or_path(name_or_path)
        path = Path(name_or_path).expanduser().absolute()  # the same folder wherever the working directory goes
    _files.check_saved(path)
    if _lora.is_adapter_dir(path):
        return _open_adapter(path, options=options)
    metadata = _metadata(path, adapter_base=adapter_base)
    with _files.diagnosed(path):
        options.check_fits(_registry._read_json(path / "config.json"), path.name)
    _check_tokenizer_files(p.name for p in path.iterdir())
    return _open(path, metadata=metadata, revision=None, sha256=_hash_files(path), options=options)


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
    if not isinstance(model, str | os.PathLike):
        msg = (
            "`model` must be a model from `sc_c2s.models.load`, a name from `sc_c2s.models.available()`, 'demo' or "
            f"a checkpoint directory, got a {type(model).__name__}."
        )
        raise TypeError(msg)
    return load(model, device=device)


def check_name_or_path(name_or_path: str | os.PathLike[str], *, also: Iterable[str] = ()) -> None:
    """Refuse what :func:`load` cannot open, with a message listing the names it can.

    Parameters
    ----------
    name_or_path
        A name from :func:`~sc_c2s.models.available` (or its repository), ``"demo"``, or a checkpoint directory.
    also
        Further names the caller accepts (e.g. ``"scratch"`` of :func:`sc_c2s.tl.finetune`), listed first.
    """
    also = list(also)
    if isinstance(name_or_path, str) and (
        name_or_path in also or name_or_path == _registry.DEMO or _registry.lookup(name_or_path) is not None
    ):
        return
    if str(name_or_path).strip() and Path(name_or_path).expanduser().is_dir():  # Path("") is the working directory
        return
    if str(name_or_path).strip() and Path(name_or_path).expanduser().exists():
        msg = (
            f"{str(name_or_path)!r} is a file, not a checkpoint directory; pass the folder that holds the model's "
            "config.json and weights."
        )
        raise ValueError(msg)
    msg = (
        f"{str(name_or_path)!r} is neither {''.join(f'{name!r}, ' for name in also)}a checkpoint directory nor a "
        f"name from `sc_c2s.models.available()`: {', '.join(map(repr, _registry.names()))}."
    )
    raise ValueError(msg)


@dataclass
class _Options:
    """How to load: the device, the dtype, quantisation, the attention kernel, merging an adapter; checked."""

    device: torch.device
    dtype: torch.dtype
    quantization: str | None
    attn_implementation: str | None
    merge: bool
    dtype_given: bool

    @classmethod
    def check(cls, device, dtype, quantization, attn_implementation, *, merge: bool) -> _Options:
        """Check the options before anything is downloaded or read."""
        import torch

        merge = check_flag(merge, "merge")
        dtype_given = dtype is not None
        device, dtype = _runtime.device_and_dtype(device, dtype)
        quantization = _memory.check_quantization(quantization)
        if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
            msg = f"`attn_implementation` must be None or one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}."
            raise ValueError(msg)
        if quantization is not None:
            if device.type != "cuda":
                msg = (
                    f"`quantization={quantization!r}` runs on a CUDA GPU (bitsandbytes), not on {device}; load the "
                    'model without quantization there, or on a GPU machine with `pip install "sc-c2s[quantization]"`.'
                )
                raise ValueError(msg)
            if merge:
                msg = "`merge=True` folds an adapter into 16-bit weights; with `quantization`, keep `merge=False`."
                raise ValueError(msg)
            import_optional("bitsandbytes", extra="quantization", purpose=f"Loading in {quantization}")
        if attn_implementation == "flash_attention_2":
            if device.type != "cuda" or dtype not in {torch.bfloat16, torch.float16}:
                msg = (
                    "FlashAttention-2 runs on a CUDA GPU in bfloat16 or float16, not on "
                    f"{device} in {str(dtype).removeprefix('torch.')}."
                )
                raise ValueError(msg)
            import_optional(
                "flash_attn",
                extra=None,
                purpose="FlashAttention-2",
                install="pip install flash-attn --no-build-isolation",
            )
        return cls(device, dtype, quantization, attn_implementation, merge, dtype_given)

    def check_fits(self, config: Mapping[str, Any], name: str) -> None:
        """Refuse a model the device cannot hold in the dtype it will load in.

        `config` is the model's ``config.json``, or what :data:`sc_c2s.models._memory.ARCHITECTURES` has of it;
        see :func:`sc_c2s.models._memory.check_fits`.
        """
        dtype = self._dtype_for(config.get("model_type", ""))
        _memory.check_fits(
            _memory.shape(config), name=name, device=self.device, dtype=dtype, quantization=self.quantization
        )

    def _dtype_for(self, model_type: str) -> torch.dtype:
        """Choose the dtype to load a model of `model_type` in: not float16 for Gemma unless asked for."""
        import torch

        if not self.dtype_given and self.dtype == torch.float16 and model_type.startswith("gemma"):
            return torch.float32
        return self.dtype

    def for_model(self, path: Path) -> _Options:
        """Adjust to the checkpoint in `path`: no float16 for Gemma; an attention kernel the model has."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        options = self
        dtype = self._dtype_for(config.model_type)
        if dtype != self.dtype:
            logg.info("    in float32: Gemma's activations overflow float16, and this GPU has no bfloat16")
            options = dataclasses.replace(self, dtype=dtype)
        if self.attn_implementation is None and config.model_type == "gemma2":
            # Gemma 2 soft-caps its attention logits, which only the eager kernel does (transformers 5 picks it
            # by itself; 4.x took SDPA)
            options = dataclasses.replace(options, attn_implementation="eager")
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        supported = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
        flag = supported.get(self.attn_implementation)
        # transformers 4.x lets Gemma 2 run SDPA, which drops its soft-capping; 5.x refuses it
        gemma_sdpa = config.model_type == "gemma2" and self.attn_implementation == "sdpa"
        if model_class is not None and flag is not None and (gemma_sdpa or not getattr(model_class, flag, True)):
            why = (
                " (Gemma 2 soft-caps its attention logits, which SDPA cannot do)"
                if config.model_type == "gemma2"
                else ""
            )
            msg = (
                f"{model_class.__name__} does not run with `attn_implementation={self.attn_implementation!r}`{why}; "
                "leave it None for the default, or use 'eager'."
            )
            raise ValueError(msg)
        return options


def _check_tokenizer_files(files: Iterable[str]) -> None:
    """Check that a SentencePiece ``tokenizer.model`` alone (as in the Gemma-2 checkpoints) can be read.

    It needs sentencepiece and protobuf: say so before downloading, not with transformers' misleading error after.
    """
    files = set(files)
    if _files.SENTENCEPIECE_FILE in files and "tokenizer.json" not in files:
        purpose = "Reading a SentencePiece tokenizer.model (as the Gemma-2 checkpoints have)"
        for module in ("sentencepiece", "google.protobuf"):
            import_optional(module, extra="gemma", purpose=purpose)


def _open(
    path: Path, *, metadata: C2SMetadata, revision: str | None, sha256: dict[str, str], options: _Options
) -> C2SModel:
    if options.merge:
        logg.warning(f"`merge=True` folds a LoRA adapter into its base; {metadata.name or path.name} is a whole model")
    with _files.diagnosed(path):
        options = options.for_model(path)
    device, dtype = options.device, options.dtype
    precision = options.quantization or str(dtype).removeprefix("torch.")
    start = logg.info(f"loading {metadata.name or path.name} on {device} in {precision}")
    with _files.diagnosed(path):
        tokenizer, model = _runtime.from_pretrained(
            path,
            dtype=dtype,
            device=device,
            quantization=options.quantization,
            attn_implementation=options.attn_implementation,
        )
        _runtime.prepare_tokenizer(tokenizer, model, path)  # a tokenizer that does not fit: a damaged file?
    if options.quantization is None:
        model.to(device)
    model.eval()
    logg.info("    finished", time=start)
    return C2SModel(model=model, tokenizer=tokenizer, metadata=metadata, path=path, revision=revision, sha256=sha256)


def _open_adapter(path: Path, *, options: _Options) -> C2SModel:
    """Load the base model an adapter names, check it is the one it was trained on, and apply the adapter.

    The adapter's files are checked first, before its base model is read or downloaded.
    """
    if not (path / METADATA_FILE).is_file():
        msg = (
            f"{path} holds an adapter but no {METADATA_FILE} naming its base model; sc_c2s opens the adapters that "
            "`sc_c2s.tl.finetune(..., adapter='lora')` writes."
        )
        raise ValueError(msg)
    problem = _files.diagnose_adapter(path)
    if problem is not None:
        raise _files.BrokenCheckpointError(problem)
    metadata = C2SMetadata.read(path)
    base = (metadata.adapter or {}).get("base")
    if base is None:
        msg = f"The {METADATA_FILE} of the adapter in {path} names no base model (its `adapter` field is empty)."
        raise ValueError(msg)
    _lora.peft()  # before the base model is downloaded or read
    source = _base_source(base, path)
    base_model = _load(
        source,
        revision=base.get("revision") if isinstance(source, str) else None,
        options=dataclasses.replace(options, merge=False),
        adapter_base=True,
    )
    changed = sorted(f for f, h in base.get("sha256", {}).items() if base_model.sha256.get(f, h) != h)
    if changed:
        cause = (
            " The demo model bundled with sc_c2s has changed since (another release of sc_c2s)."
            if base["model"] == _registry.DEMO
            else ""
        )
        msg = (
            f"The base model {base['model']!r} at {base_model.path} is not the one the adapter in {path} was "
            f"trained on: {', '.join(changed)} differ.{cause} Train the adapter again on this base, or write the "
            f"directory of a copy of the base it was trained on into the adapter's {METADATA_FILE} "
            "(`adapter.base.path`)."
        )
        raise ValueError(msg)
    start = logg.info(f"applying the LoRA adapter {metadata.name or path.name}{' (merged)' if options.merge else ''}")
    model = _lora.apply_adapter(base_model.model, path, merge=options.merge)
    model.eval()
    logg.info("    finished", time=start)
    return C2SModel(model=model, tokenizer=base_model.tokenizer, metadata=metadata, path=path, sha256=_hash_files(path))


def _base_source(base: dict, path: Path) -> str | Path:
    """Where to load an adapter's base model from.

    A base loaded from the registry (recorded with its revision) comes from the registry by name, the rest from the
    directory it was trained from, even when a registry checkpoint has the same name; the demo model, from that
    directory or else from this installation (the hashes of its files are checked after).
    """
    if base.get("revision") is not None and _registry.lookup(base["model"]) is not None:
        return base["model"]
    if base.get("path") and Path(base["path"]).is_dir():
        return Path(base["path"])
    if base["model"] == _registry.DEMO:  # trained in another environment, whose copy of the demo is elsewhere
        return _registry.DEMO
    msg = (
        f"The base model of the adapter in {path}, {base['model']!r}, is neither in the registry nor at "
        f"{base.get('path')!r}. Put it back there, or write its directory into the adapter's {METADATA_FILE} "
        "(`adapter.base.path`)."
    )
    raise FileNotFoundError(msg)


def _metadata(path: Path, *, adapter_base: bool = False) -> C2SMetadata:
    """Metadata of a checkpoint directory: its own file, else the registry's, else defaults (with a warning).

    A directory that lacks the files every checkpoint has, or whose metadata file cannot be read, is refused. An
    `adapter_base` gets the defaults without the warning: the adapter's metadata, not these, say how to prompt it.
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
    if not adapter_base:
        logg.warning(
            f"{path} has no {METADATA_FILE} and is not a published checkpoint: prompting it with the defaults of "
            "C2SMetadata (published prompt format, Homo sapiens, 200 genes)."
        )
    return C2SMetadata(name=path.name, answer_prefix=None)


def _hash_files(path: Path) -> dict[str, str]:
    """sha256 of the configuration, weight and tokenizer files of a checkpoint directory."""
    import pooch

    return {
        p.name: pooch.file_hash(str(p))
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES and p.name != _download.HASHES_FILE
    }
