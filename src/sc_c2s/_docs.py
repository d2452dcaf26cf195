"""Parameter descriptions shared by several functions, written once."""

from __future__ import annotations

from collections.abc import Callable
from inspect import cleandoc
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def doc_params(**params: str) -> Callable[[F], F]:
    """Fill ``{name}`` fields of a docstring with shared parameter descriptions."""

    def decorate(obj: F) -> F:
        obj.__doc__ = cleandoc(obj.__doc__).format_map(params)
        return obj

    return decorate


doc_adata = """\
adata
    Annotated data matrix of cells × genes, or a :class:`~mudata.MuData` whose ``mod`` modality holds them."""

doc_mod = """\
mod
    Modality of a :class:`~mudata.MuData` that holds gene expression (default ``"rna"``); ignored for
    :class:`~anndata.AnnData`. Columns added to ``obs`` are mirrored into ``mdata.obs`` as ``"{mod}:{key}"``."""

doc_model = """\
model
    A model from :func:`sc_c2s.models.load`, or anything it accepts: a name from
    :func:`sc_c2s.models.available`, ``"demo"``, or the path of a checkpoint directory."""

doc_device = """\
device
    Torch device to run on. A loaded model passed as `model` is moved there in place (keeping its dtype) and
    stays there; ``None`` leaves it where it is, and loads a model given by name or path on CUDA if available,
    else the CPU."""

doc_batch_size = """\
batch_size
    Cells per forward pass; ``None`` picks a size for the device: on a GPU, as many as fit into its free memory
    for each batch's prompt length (a batch that still runs out of memory is retried in halves)."""

doc_organism = """\
organism
    ``"Homo sapiens"`` or ``"Mus musculus"`` for the prompt; ``None`` takes the model's."""

doc_groups = """\
groupby
    Column of ``obs`` that defines the groups of cells (sample, donor or cluster); cells where it is missing
    belong to no group."""

doc_n_cells = """\
n_cells
    Cells per prompt; ``None``: 10, as in C2S-Scale's prompts (trained on 5 to 20), clipped into the range the
    model was trained on where its metadata records one (``model.metadata.training["n_cells"]``)."""

doc_show_ax = """\
ax
    Axes to draw on; a new figure if ``None``.
show
    Show the plot; ``None`` follows :attr:`scanpy.settings.autoshow`.
return_fig
    Return the figure instead of the axes."""

doc_seed = """\
(a non-negative integer; ``None`` draws one from NumPy's global random state, as scanpy does, and a
    :class:`numpy.random.Generator` or :class:`~numpy.random.RandomState` draws one from itself)"""

doc_client = """\
client
    A :class:`distributed.Client` to spread the cells over, in row chunks; ``None`` uses the active client when
    ``obsm["c2s_genes"]`` is a dask array (from :func:`sc_c2s.pp.to_sentences` on dask data), and runs in this
    process otherwise. Each worker loads the model once, by name or path, on its own GPU where it has one; the
    results are those of a run in one process. See :doc:`/scaling`."""
