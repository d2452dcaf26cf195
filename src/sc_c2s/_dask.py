"""Dask: ranking a lazy matrix chunk by chunk, and running the model verbs over row chunks on a Dask cluster.

Everything sc_c2s does with Dask lives here; the verbs call in through small hooks. Dask is imported only when a
dask array or a client is at hand, so the rest of the package works without it.

The model verbs (:func:`sc_c2s.tl.annotate`, :func:`sc_c2s.tl.embed`) run on each row chunk of
``obsm["c2s_genes"]`` as a task: the task builds a small AnnData of its cells and calls the verb itself, with the
model its worker process has loaded once (:func:`worker_model`). The model travels by reference (name or path,
revision, dtype, hashes of its files), never as pickled weights; a worker loads it on its own device (its GPU where
it has one) and keeps the last model it loaded.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scanpy import logging as logg

from ._keys import C2S, GENES
from ._utils._optional import import_optional

if TYPE_CHECKING:
    import os

    import dask.array as da
    import torch
    from anndata import AnnData
    from distributed import Client
    from mudata import MuData

    from .models import C2SModel

#: Rows per chunk when in-memory sentences are spread over a client: this many chunks per worker.
_CHUNKS_PER_WORKER = 4


def is_dask_array(X: object) -> bool:
    """Whether `X` is a dask array (without importing dask: nobody holds one unless dask is imported)."""
    array = sys.modules.get("dask.array")
    return array is not None and isinstance(X, array.Array)


def _dask_array() -> Any:
    return import_optional("dask.array", extra="dask", purpose="Working on Dask arrays")


# ---- ranking ------------------------------------------------------------------------------------------------------


def rank_lazily(X: da.Array, *, n_genes: int | None, random_state: int, source: str, fix: str) -> da.Array:
    """Rank the genes of each row of a dask array, chunk by chunk, into a lazy int32 array of gene indices.

    Chunks may be dense or scipy sparse; columns are joined into one chunk first. Values equal those of
    :func:`sc_c2s.pp._rank.rank_genes` on the whole matrix (the tie-break key depends on the global row number).
    With `n_genes`, the result has ``min(n_genes, n_genes_in_X)`` columns even when no cell expresses that many
    genes, as in memory; without it, the longest row is counted first, which reads the data once more. `source`
    and `fix` are for the message of data that is not expression (see :func:`sc_c2s.pp._rank.rank_genes`).
    """
    if X.ndim != 2:
        msg = f"`{source}` must be a 2-dimensional dask array, got {X.ndim} dimensions."
        raise ValueError(msg)
    if X.numblocks[1] > 1:
        X = X.rechunk({1: -1})
    if n_genes is None:
        longest = X.map_blocks(_longest_row, dtype=np.int64, chunks=((1,) * X.numblocks[0], (1,)))
        width = int(longest.max().compute())
    else:
        width = min(n_genes, X.shape[1])
    return X.map_blocks(
        _rank_block,
        width=width,
        random_state=random_state,
        source=source,
        fix=fix,
        dtype=np.int32,
        chunks=(X.chunks[0], (width,)),
        meta=np.empty((0, 0), dtype=np.int32),
    )


def held_here(X: da.Array) -> tuple[np.ndarray, da.Array]:
    """Compute `X` once; return its values and a dask array of them, chunked alike, held in this process.

    Unlike :meth:`~dask.array.Array.persist`, whose result lives on the active client's workers and fails once the
    client closes.
    """
    values = X.compute()
    return values, _dask_array().from_array(values, chunks=X.chunks)


def _longest_row(block: Any) -> np.ndarray:
    """Most expressed genes in a row of one chunk, counted as the ranking counts them.

    Stored zeros are left out, and a gene stored twice in a row counts once.
    """
    from scipy import sparse

    from .pp._rank import _max_expressed, canonical

    if not sparse.issparse(block):
        return np.array([[_max_expressed(block)]], dtype=np.int64)
    rows = canonical(sparse.csr_matrix(block))
    row_of_entry = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    return np.array([[np.bincount(row_of_entry[rows.data != 0]).max(initial=0)]], dtype=np.int64)


def with_row_chunks(X: da.Array) -> da.Array:
    """`X` with chunks whose rows can be taken (``X[rows]``): COO and other sparse chunks converted to CSR."""
    from scipy import sparse

    def indexable(block: Any) -> Any:
        return sparse.csr_matrix(block) if sparse.issparse(block) and block.format not in ("csr", "csc") else block

    return X.map_blocks(indexable, dtype=X.dtype)


def _rank_block(
    block: Any, *, width: int, random_state: int, source: str, fix: str, block_info: dict | None = None
) -> np.ndarray:
    """Rank one row chunk; its rows are cells ``start …`` of the whole matrix, which the tie-break key reads."""
    from .pp._rank import rank_genes

    start = block_info[0]["array-location"][0][0] if block_info else 0
    cells = np.arange(start, start + block.shape[0], dtype=np.int64)
    return rank_genes(block, n_genes=width, random_state=random_state, cells=cells, source=source, fix=fix).genes


# ---- model verbs over row chunks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelReference:
    """What a worker needs to load a model itself, and to tell whether the model it holds is that one."""

    name_or_path: str
    """Registry name (with :attr:`revision`), ``"demo"``, or the absolute path of a checkpoint directory."""
    revision: str | None
    """Hugging Face revision of a registry model."""
    device: str | None
    """Device asked for; ``None`` lets each worker take its own GPU, or the CPU."""
    dtype: str | None
    """Floating-point type of the weights; ``None`` for the default of :func:`sc_c2s.models.load`."""
    files: tuple[tuple[str, str], ...] | None = None
    """sha256 of each file of a loaded model (:attr:`sc_c2s.models.C2SModel.sha256`), which the worker's copy
    must match; ``None`` for a name or path given as such, which takes the files as they are."""
    stamp: tuple[tuple[str, int, int, int], ...] | None = None
    """Name, size, inode and modification time (ns) of each file of a directory given by its path, as the verb
    was called: a model a worker loaded from the directory before its files were rewritten does not serve it."""


#: The model this process loaded last for Dask tasks, by the reference it was loaded for: one at most, so that a
#: worker holds one model (a GPU-sized one is dropped before the next loads). Each worker process holds its own.
_MODELS: dict[ModelReference, C2SModel] = {}
#: Loaded models passed to a verb in this process, the latest for each reference: tasks that run here use them.
_GIVEN: weakref.WeakValueDictionary[ModelReference, C2SModel] = weakref.WeakValueDictionary()
#: How many times this process loaded each reference.
LOADS: Counter[ModelReference] = Counter()
#: Threads of a worker load one at a time, and each model once.
_LOADING = threading.Lock()


def reference(model: C2SModel | str | os.PathLike[str], *, device: str | torch.device | None) -> ModelReference:
    """Refer to `model` by name or path, so that workers load it themselves instead of receiving its weights.

    A loaded registry model is sent as its name and revision, any other loaded model as the absolute path of the
    directory it was loaded from, with its dtype (not its quantisation or attention kernel: workers load with the
    defaults of :func:`sc_c2s.models.load`) and the sha256 of its files, which a worker checks the files it loads
    against (a registry model's revision pins them). Workers load from files, so changes made to the weights in
    memory and not saved reach no worker. A loaded model is also moved to `device`, if given, and registered for
    this process (the latest for its reference), so tasks that run here use it there.
    """
    from .models import C2SModel, resolve

    device = None if device is None else str(device)
    if not isinstance(model, C2SModel):
        name_or_path, revision = _source(str(model))
        return ModelReference(name_or_path, revision, device, None, stamp=_stamp(name_or_path))
    resolve(model, device=device)  # moved there (or the device refused), as the verb does in memory
    dtype = str(model.dtype).removeprefix("torch.")
    if model.revision is not None and model.metadata.name:  # the revision pins the files
        ref = ModelReference(model.metadata.name, model.revision, device, dtype)
    else:
        ref = ModelReference(
            *_source(str(model.path.absolute())), device, dtype, tuple(sorted(model.sha256.items())) or None
        )
    _GIVEN[ref] = model
    return ref


def _source(name_or_path: str) -> tuple[str, str | None]:
    """Read `name_or_path` as :func:`sc_c2s.models.load` does, into the source of a reference.

    That is the name and revision of a registry checkpoint, ``"demo"``, or the absolute path of a directory;
    anything else stays as it is, for the worker to report.
    """
    from .models import _registry

    entry = _registry.lookup(name_or_path)
    if entry is not None:
        return entry.name, entry.revision
    path = Path(name_or_path).expanduser()
    if name_or_path == _registry.DEMO or path.absolute() == _registry.demo_dir().absolute():
        return _registry.DEMO, None
    return (str(path.absolute()), None) if path.is_dir() else (name_or_path, None)


def _stamp(name_or_path: str) -> tuple[tuple[str, int, int, int], ...] | None:
    """:attr:`ModelReference.stamp` of the files of `name_or_path`, if it is an absolute directory path."""
    path = Path(name_or_path)
    if not (path.is_absolute() and path.is_dir()):
        return None
    stats = ((p.name, p.stat()) for p in sorted(path.iterdir()) if p.is_file())
    return tuple((name, st.st_size, st.st_ino, st.st_mtime_ns) for name, st in stats)


def worker_model(ref: ModelReference) -> C2SModel:
    """Return the model of `ref`, loaded once per process (each Dask worker is one) on the worker's own device.

    A model registered here by :func:`reference` is used as it is. Otherwise the process keeps the model it
    loaded last, and uses it while `ref` asks for the same checkpoint, device and dtype (a name or path asks for
    the dtype it was loaded in by default, a loaded model for its own) and, for a loaded model, the same files (for
    a path, files not rewritten since it loaded them); else it drops it and loads `ref`. Threads of a process load
    one at a time.
    """
    given = _GIVEN.get(ref)
    if given is not None:
        return given
    with _LOADING:
        held = next(((r, m) for r, m in _MODELS.items() if _serves(r, m, ref)), None)
        if held is not None:
            return held[1]
        _MODELS.clear()
        _MODELS[ref] = _load(ref)
        LOADS[ref] += 1
        return _MODELS[ref]


def _serves(held: ModelReference, model: C2SModel, ref: ModelReference) -> bool:
    """Whether `model`, loaded for `held`, is what `ref` asks for."""
    if replace(held, dtype=None, files=None) != replace(ref, dtype=None, files=None):  # checkpoint, device, stamp
        return False
    dtype = held.dtype is None if ref.dtype is None else str(model.dtype).removeprefix("torch.") == ref.dtype
    return dtype and (ref.files is None or dict(ref.files) == model.sha256)


def _load(ref: ModelReference) -> C2SModel:
    """Load the model of `ref`; refuse one whose files are not those of the loaded model `ref` was made from."""
    from .models import load

    model = load(ref.name_or_path, revision=ref.revision, device=ref.device, dtype=ref.dtype)
    expected = dict(ref.files or model.sha256)
    changed = sorted(f for f in expected.keys() | model.sha256.keys() if model.sha256.get(f) != expected.get(f))
    if changed:
        msg = (
            f"The files of {ref.name_or_path} changed after the model passed was loaded from them "
            f"({', '.join(changed)} differ), and Dask workers load the model from its files. Load it again with "
            "`sc_c2s.models.load` and pass that, or save a changed model into a new directory with `.save()` and "
            "load it from there."
        )
        raise ValueError(msg)
    return model


def wanted(adata: AnnData | MuData, mod: str | None, client: Client | None) -> bool:
    """Whether a model verb runs over Dask: a client is given, or ``obsm["c2s_genes"]`` is a dask array."""
    from ._data import DataHandler

    handler = DataHandler(adata, mod)
    return client is not None or is_dask_array(handler.obsm.get(GENES))


def map_verb(
    verb: Callable[..., Any],
    adata: AnnData | MuData,
    *,
    model: C2SModel | str | os.PathLike[str],
    device: str | torch.device | None,
    mod: str | None,
    client: Client | None,
    copy: bool,
    start: Any,
    **kwargs: Any,
) -> AnnData | MuData | None:
    """Run `verb` on each row chunk of ``obsm["c2s_genes"]`` as a Dask task, and write the results in cell order.

    Each task calls `verb` on an AnnData of its cells (their gene indices and ``uns["c2s"]``) with the model its
    worker loaded once (empty chunks are skipped); the values are those of `verb` on the whole data. `start` is
    the time the verb logged its start at. Tasks run on `client`, else on the active client, else one after
    another in this process. Nothing is written until all have finished. The verb's warnings in the tasks, and
    those it logged through scanpy, are given again here, each text once, naming the cells of the tasks that gave
    it when some tasks did not (their counts are per task).
    """
    from ._data import DataHandler, prepare

    handler = DataHandler(adata, mod)
    c2s = handler.c2s()
    dask = import_optional("dask", extra="dask", purpose="Running models over Dask")
    client = _client(client)
    genes = _row_chunks(handler.obsm[GENES], client)
    shared = dask.delayed(
        {
            "verb": verb,
            "model": reference(model, device=device),
            "c2s": {key: c2s[key] for key in ("genes", "params", "rank_fit") if key in c2s},
            "kwargs": kwargs,
        },
        pure=True,
    )
    blocks = [block for block, n in zip(genes.to_delayed().ravel(), genes.chunks[0], strict=True) if n]
    offsets = np.cumsum((0, *(n for n in genes.chunks[0] if n)))
    names = handler.obs_names
    tasks = [
        dask.delayed(_run_chunk, pure=True)(shared, block, names[offsets[i] : offsets[i + 1]])
        for i, block in enumerate(blocks)
    ]
    chunks = _compute(tasks, client)
    _warn_again([caught for _, caught in chunks], offsets, n_cells=len(names))
    results = _combine([chunk for chunk, _ in chunks])
    adata = prepare(adata, copy=copy, stacklevel=4)  # the caller of the verb that called this
    DataHandler(adata, mod).save_all(results, start=start)
    return adata if copy else None


def map_cells(
    fn: Callable[..., tuple],
    *,
    model: C2SModel | str | os.PathLike[str],
    device: str | torch.device | None,
    client: Client | None,
    sliced: dict[str, np.ndarray],
    **shared: Any,
) -> tuple:
    """Run ``fn(model, first_cell=, **sliced_chunk, **shared)`` on chunks of cells as Dask tasks; join in order.

    The arrays of `sliced` are cut into chunks of cells (a few per worker); the rest goes to every task once.
    `fn` returns a tuple of per-cell results (arrays or sparse matrices, cells first), which are joined in cell
    order. Tasks run on `client`, else on the active client, else in this process.
    """
    from scipy import sparse

    dask = import_optional("dask", extra="dask", purpose="Running models over Dask")
    client = _client(client)
    n_cells = len(next(iter(sliced.values())))
    step = max(1, -(-n_cells // (_CHUNKS_PER_WORKER * _n_workers(client))))
    common = dask.delayed({"fn": fn, "model": reference(model, device=device), "shared": shared}, pure=True)
    tasks = [
        dask.delayed(_run_cells, pure=True)(common, start, {k: v[start : start + step] for k, v in sliced.items()})
        for start in range(0, n_cells, step)
    ]
    chunks = _compute(tasks, client)
    return tuple(
        sparse.vstack(parts, format="csr") if sparse.issparse(parts[0]) else np.concatenate(parts)
        for parts in zip(*chunks, strict=True)
    )


def _compute(tasks: list, client: Client | None) -> list:
    """Compute `tasks` on `client`, else in this process, in order.

    A task that fails, or an interrupt (Ctrl-C), cancels the tasks not yet done: the cluster does not go on with a
    job whose results nobody will read, while the next call waits behind it.
    """
    if client is None:
        import dask

        return list(dask.compute(*tasks, scheduler="sync"))
    futures = client.compute(tasks)
    try:
        return client.gather(futures)
    except BaseException:
        with suppress(Exception):  # a client that died with the job cannot cancel; the error to show is the job's
            client.cancel(futures)
        raise


def _run_cells(common: dict[str, Any], first_cell: int, sliced: dict[str, np.ndarray]) -> tuple:
    return common["fn"](worker_model(common["model"]), first_cell=first_cell, **sliced, **common["shared"])


def check_client(client: Client | None) -> None:
    """Refuse a `client` that is not a running :class:`distributed.Client` (``None`` passes)."""
    if client is not None:
        _client(client)


def _n_workers(client: Client | None) -> int:
    """Count the workers of `client` (1 without one) by their threads.

    Not by ``scheduler_info()``, which lists at most 5 of them in distributed 2025.5 to 2025.12.
    """
    return max(1, len(client.nthreads())) if client is not None else 1


def _client(client: Client | None) -> Client | None:
    """Return `client`, checked to be a running :class:`distributed.Client`; without one, the active client or none.

    The active client is the one of this context, if distributed is installed and one is running.
    """
    if client is None:
        if sys.modules.get("distributed") is None:  # never imported, so no client; or blocked (`None`)
            return None
        from distributed import get_client

        try:
            return get_client()
        except ValueError:  # no client
            return None
    distributed = import_optional("distributed", extra="dask", purpose="Running models over a Dask cluster")
    if not isinstance(client, distributed.Client):
        msg = (
            f"`client` must be a `distributed.Client`, got {type(client).__name__}; connect one to a cluster with "
            "`Client(cluster)` or `Client('tcp://scheduler:8786')`."
        )
        raise TypeError(msg)
    if client.status != "running":
        msg = f"The Dask client is {client.status}; start a new one (`Client(cluster)`) or pass `client=None`."
        raise ValueError(msg)
    return client


def _warn_again(caught: list[list[tuple[type[Warning] | None, str]]], offsets: np.ndarray, *, n_cells: int) -> None:
    """Give the warnings of the tasks here, each text once, after the cells of the tasks that gave it.

    A category of ``None`` is a warning logged through scanpy, logged again. A warning that counts something (e.g.
    empty answers) counts it in its task's cells only, so the cells say of which part of the data it speaks; one
    that every task gave (about the arguments or the model, say) names no cells.
    """
    tasks: dict[tuple[type[Warning] | None, str], list[str]] = {}
    for i, task_warnings in enumerate(caught):
        for warning in dict.fromkeys(task_warnings):
            tasks.setdefault(warning, []).append(f"{offsets[i]}–{offsets[i + 1] - 1}")
    for (category, message), cells in tasks.items():
        where = f"In cells {', '.join(cells)} of {n_cells} (one Dask task each): " if len(cells) < len(caught) else ""
        if category is None:
            logg.warning(where + message)
        else:
            warnings.warn(where + message, category, stacklevel=4)


def _row_chunks(genes: Any, client: Client | None) -> da.Array:
    """``obsm["c2s_genes"]`` as a dask array of row chunks: as it is, or in-memory cut into a few per worker."""
    array = _dask_array()
    if is_dask_array(genes):
        return genes.rechunk({1: -1}) if genes.numblocks[1] > 1 else genes
    genes = np.asarray(genes)
    rows = max(1, -(-genes.shape[0] // (_CHUNKS_PER_WORKER * _n_workers(client))))
    return array.from_array(genes, chunks=(rows, -1))


def _run_chunk(
    shared: dict[str, Any], genes: np.ndarray, obs_names: pd.Index
) -> tuple[dict[tuple[str, str], Any], list[tuple[type[Warning], str]]]:
    """Run the verb on one chunk of cells; return what it added, keyed by ``(attribute, key)``, and its warnings.

    Warnings on a worker would reach no one, so the verb's user warnings, and the warnings it logs through scanpy
    (category ``None``), travel back with the results.
    """
    from anndata import AnnData

    chunk = AnnData(obs=pd.DataFrame(index=obs_names), obsm={GENES: np.asarray(genes)}, uns={C2S: shared["c2s"]})
    with _TASK_WARNINGS.record() as caught, _logged_warnings() as logged:
        shared["verb"](chunk, model=worker_model(shared["model"]), **shared["kwargs"])
    results: dict[tuple[str, str], Any] = {("obs", key): chunk.obs[key] for key in chunk.obs.columns}
    results |= {("obsm", key): chunk.obsm[key] for key in chunk.obsm if key != GENES}
    results |= {("uns", key): chunk.uns[key] for key in chunk.uns if key != C2S}
    raised = [(w.category, str(w.message)) for w in caught if issubclass(w.category, UserWarning)]
    return results, raised + [(None, text) for text in logged]


@contextmanager
def _logged_warnings() -> Iterator[list[str]]:
    """Take the warnings this thread logs through scanpy inside the block, into the list it yields, unwritten."""
    from scanpy import settings

    recorder = _ThreadRecorder()
    settings._root_logger.addFilter(recorder)  # the logger `scanpy.logging.warning` writes to
    try:
        yield recorder.messages
    finally:
        settings._root_logger.removeFilter(recorder)


class _ThreadRecorder(logging.Filter):
    """Keep, and hold back, the warnings that the thread which made it logs (a worker's threads share a logger)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or record.levelno < logging.WARNING:
            return True
        self.messages.append(record.getMessage())
        return False


class _TaskWarnings:
    """Record the warnings of each task apart, while the threads of a worker run several tasks at once.

    :class:`warnings.catch_warnings` swaps process-wide state (before Python 3.14's context-aware warnings): a task
    that enters it after another and leaves it last lost the other's later warnings, which reached no one. Here
    the first task in installs one recorder that files each warning under the thread that raised it, every time
    (``"always"``), and the last task out restores what was there. Warnings of other threads meanwhile are shown
    as before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks = 0
        self._installed: warnings.catch_warnings | None = None
        self._thread = threading.local()

    @contextmanager
    def record(self) -> Iterator[list[warnings.WarningMessage]]:
        """Record the warnings this thread raises inside the block into the list it yields."""
        if getattr(sys.flags, "context_aware_warnings", False):  # each thread has its own filters and recorder
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield caught
            return
        caught: list[warnings.WarningMessage] = []
        with self._lock:
            if self._tasks == 0:
                self._installed = warnings.catch_warnings()
                self._installed.__enter__()
                warnings.simplefilter("always")
                warnings.showwarning = functools.partial(self._show, warnings.showwarning)
            self._tasks += 1
        self._thread.caught = caught
        try:
            yield caught
        finally:
            del self._thread.caught
            with self._lock:
                self._tasks -= 1
                if self._tasks == 0:
                    self._installed.__exit__(None, None, None)
                    self._installed = None

    def _show(self, shown: Callable[..., None], message: Warning | str, category: type[Warning], *where: Any) -> None:
        caught = getattr(self._thread, "caught", None)
        if caught is None:
            shown(message, category, *where)
        else:
            caught.append(warnings.WarningMessage(message, category, *where))


_TASK_WARNINGS = _TaskWarnings()


def _combine(chunks: list[dict[tuple[str, str], Any]] | tuple) -> dict[tuple[str, str], Any]:
    """Join the chunks' results in cell order; categories of ``obs`` columns are joined as the verb makes them.

    A categorical column takes the sorted union of the chunks' categories, as the verb sorts those it gives.
    """
    results: dict[tuple[str, str], Any] = {}
    for attr, key in chunks[0]:
        values = [chunk[attr, key] for chunk in chunks]
        if attr == "uns":
            results[attr, key] = values[0]
        elif attr == "obsm":
            results[attr, key] = np.concatenate([np.asarray(v) for v in values])
        elif isinstance(values[0].dtype, pd.CategoricalDtype):
            joined = np.concatenate([v.astype(object).to_numpy() for v in values])
            results[attr, key] = pd.Categorical(
                joined, categories=sorted({c for v in values for c in v.cat.categories})
            )
        else:
            results[attr, key] = np.concatenate([v.to_numpy() for v in values])
    return results
