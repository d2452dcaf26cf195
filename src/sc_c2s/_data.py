"""Access to :class:`~anndata.AnnData` and :class:`~mudata.MuData`: every verb reads and writes through here."""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from ._dask import is_dask_array
from ._keys import C2S, GENES, LOG1P, SENTENCE
from ._utils._numba import numba_threads
from ._utils._validate import check_expression_dtype, check_flag, check_name

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mudata import MuData

DEFAULT_MOD = "rna"


def _is_mudata(data: object) -> bool:
    try:
        from mudata import MuData
    except ImportError:  # pragma: no cover - mudata is a dependency
        return False
    return isinstance(data, MuData)


def _check_ranked(ranked: np.ndarray, genes: np.ndarray, obs: pd.DataFrame, again: str) -> None:
    """Raise if `ranked` (``obsm["c2s_genes"]``) does not index `genes` or disagrees with ``obs["c2s_sentence"]``."""
    if ranked.dtype.kind not in "iu":
        msg = (
            f"`obsm[{GENES!r}]` holds {ranked.dtype} values, not gene indices (`anndata.concat(join='outer')` pads "
            f"it with NaN). {again}."
        )
        raise ValueError(msg)
    if ranked.size and ranked.max() >= len(genes):
        msg = (
            f"`obsm[{GENES!r}]` points past the {len(genes)} genes of `uns[{C2S!r}]['genes']`: they no longer belong "
            f"together. {again}."
        )
        raise ValueError(msg)
    if SENTENCE not in obs or ranked.shape[1] == 0:
        return
    from .pp._kernels import sentence_lengths

    # characters of each sentence and its first word, as the strings were written (the case aside)
    with numba_threads():
        expected = sentence_lengths(ranked, np.fromiter(map(len, genes), dtype=np.int64, count=len(genes)))
    first = np.where(ranked[:, 0] >= 0, genes[ranked[:, 0]], "")
    sentences = obs[SENTENCE].astype(object).to_numpy()
    agree = (
        isinstance(sentence, str)
        and len(sentence) == length
        and sentence.partition(" ")[0].casefold() == word.casefold()
        for sentence, length, word in zip(sentences, expected, first, strict=True)
    )
    bad = np.flatnonzero(~np.fromiter(agree, dtype=bool, count=len(sentences)))
    if bad.size:
        msg = (
            f"`obsm[{GENES!r}]` no longer matches `obs[{SENTENCE!r}]` for {bad.size} of {len(sentences)} cells "
            f"(first: {obs.index[bad[0]]!r}): the cells were combined or changed after ranking, e.g. by "
            f"`anndata.concat` of data ranked apart, which keeps one part's genes and one width, or the sentences "
            f"were edited (keep edited text in another column). {again}."
        )
        raise ValueError(msg)


@dataclass
class Matrix:
    """The expression matrix a verb works on, with the names of its genes."""

    X: Any
    """In-memory or backed matrix, cells × genes."""
    var_names: pd.Index
    """Names of the genes in the columns of :attr:`X`."""
    var: pd.DataFrame
    """Gene annotation matching the columns of :attr:`X`."""
    source: str
    """Where it came from, for messages: ``"X"``, ``"layers['counts']"`` or ``"raw.X"``."""
    log1p_base: float | None
    """Base of ``log1p`` recorded by :func:`scanpy.pp.log1p` (:data:`math.e` for its natural logarithm), ``None``
    where ``uns["log1p"]`` does not say."""


class DataHandler:
    """One entry point for :class:`~anndata.AnnData` and :class:`~mudata.MuData`.

    Parameters
    ----------
    data
        The object the user passed.
    mod
        Modality of a :class:`~mudata.MuData` that holds the expression (default ``"rna"``).
        Ignored for :class:`~anndata.AnnData`.
    """

    def __init__(self, data: AnnData | MuData, mod: str | None = None) -> None:
        if _is_mudata(data):
            mod = DEFAULT_MOD if mod is None else check_name(mod, "mod", what="modality")
            if mod not in data.mod:
                msg = f"MuData has no modality {mod!r}; pass `mod=` with one of {list(data.mod)}."
                raise KeyError(msg)
            names = data.mod[mod].obs_names
            if not names.is_unique:  # results are copied into `mdata.obs` by cell name
                msg = (
                    f"The {mod!r} modality names cells twice (e.g. {names[names.duplicated()][0]!r}), so its results "
                    f"cannot be copied into `mdata.obs` by name: make the names unique first, with "
                    f"`mdata.mod[{mod!r}].obs_names_make_unique()` and `mdata.update()`."
                )
                raise ValueError(msg)
            self.data = data
            self.adata: AnnData = data.mod[mod]
            self.mod: str | None = mod
        elif isinstance(data, AnnData):
            self.data = data
            self.adata = data
            self.mod = None
        else:
            msg = f"Expected an AnnData or MuData object, got {type(data).__name__}."
            raise TypeError(msg)

    @property
    def is_mudata(self) -> bool:
        """Whether the user passed a :class:`~mudata.MuData`."""
        return self.mod is not None

    def matrix(self, *, layer: str | None = None, use_raw: bool | None = None) -> Matrix:
        """Select the expression matrix the way scanpy does.

        ``use_raw=None`` means :attr:`~anndata.AnnData.raw` when it exists and no layer is asked for.
        """
        adata = self.adata
        if layer is not None and use_raw:
            msg = "Pass either `layer=` or `use_raw=True`, not both."
            raise ValueError(msg)
        if use_raw is None:
            use_raw = layer is None and adata.raw is not None
        log1p = adata.uns.get(LOG1P)  # {"base": None} is scanpy's natural logarithm
        base = (log1p.get("base") or math.e) if isinstance(log1p, Mapping) else None
        if use_raw:
            if adata.raw is None:
                msg = "`use_raw=True` but the AnnData has no `.raw`; pass `use_raw=False` or a `layer=`."
                raise ValueError(msg)
            raw = adata.raw
            return _checked(Matrix(raw.X, raw.var_names, raw.var, "raw.X", base))
        if layer is not None:
            if check_name(layer, "layer", what="layer") not in adata.layers:
                msg = f"No layer {layer!r}; available layers: {list(adata.layers)}."
                raise KeyError(msg)
            return _checked(Matrix(adata.layers[layer], adata.var_names, adata.var, f"layers[{layer!r}]", base))
        if adata.X is None:
            msg = (
                "`X` is None, so there is no expression to read; pass `layer=` with the layer that holds it"
                f"{f' (layers: {list(adata.layers)})' if len(adata.layers) else ''}."
            )
            raise ValueError(msg)
        return _checked(Matrix(adata.X, adata.var_names, adata.var, "X", base))

    @property
    def obs_names(self) -> pd.Index:
        """Names of the cells."""
        return self.adata.obs_names

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return self.adata.n_obs

    @property
    def uns(self) -> dict:
        """The :attr:`~anndata.AnnData.uns` that holds C2S results."""
        return self.adata.uns

    @property
    def obs(self) -> pd.DataFrame:
        """The :attr:`~anndata.AnnData.obs` of the modality that holds C2S results."""
        return self.adata.obs

    @property
    def obsm(self):
        """The :attr:`~anndata.AnnData.obsm` of the modality that holds C2S results."""
        return self.adata.obsm

    def c2s(self) -> dict:
        """Return the results of :func:`sc_c2s.pp.to_sentences`, or raise a clear error if they are missing.

        They must also still belong together: data ranked apart and joined with :func:`anndata.concat` keeps one
        part's ``uns["c2s"]`` (or none, or the fields all parts share) and cuts or pads ``obsm["c2s_genes"]`` to
        one width, so its gene indices may no longer name the genes ranked. Where ``obs["c2s_sentence"]`` holds
        the strings of the same ranking, each cell's first word and length are compared with them.
        """
        where = f"the {self.mod!r} modality" if self.is_mudata else "this AnnData"
        again = f"Run `sc_c2s.pp.to_sentences` on {where} again"
        subject = where[0].upper() + where[1:]  # the start of a sentence
        if C2S not in self.uns or GENES not in self.obsm:
            if GENES in self.obsm:
                msg = (
                    f"{subject} has `obsm[{GENES!r}]` but not `uns[{C2S!r}]`, which "
                    f"`anndata.concat` leaves out unless `uns_merge=` keeps it. {again}."
                )
                raise KeyError(msg)
            ranked = [m for m, modality in self.data.mod.items() if C2S in modality.uns] if self.is_mudata else []
            fix = (
                f"The {ranked[0]!r} modality holds them: pass `mod={ranked[0]!r}`."
                if ranked
                else "Run `sc_c2s.pp.to_sentences(adata)` first."
            )
            msg = f"No cell sentences found in {where} (`uns[{C2S!r}]` and `obsm[{GENES!r}]`). {fix}"
            raise KeyError(msg)
        c2s = self.uns[C2S]
        missing = [key for key in ("genes", "params") if key not in c2s]
        if missing:
            msg = (
                f"{subject} lacks `uns[{C2S!r}][{missing[0]!r}]`: combined from data ranked with other "
                f"genes or settings (`anndata.concat(uns_merge=...)` keeps only what all parts share)? {again}."
            )
            raise KeyError(msg)
        ranked = self.obsm[GENES]
        if is_dask_array(ranked):  # lazy: read chunk by chunk where it is used
            return c2s
        if not isinstance(ranked, np.ndarray):
            msg = (
                f"`obsm[{GENES!r}]` holds a {type(ranked).__name__}, not the array of gene indices that "
                f"`sc_c2s.pp.to_sentences` writes. {again}."
            )
            raise TypeError(msg)
        _check_ranked(ranked, np.asarray(c2s["genes"], dtype=object), self.obs, again)
        return c2s

    def ranked(self, n_genes: int | None, *, cells: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return the sentence genes and each cell's indices into them, best first, cut to `n_genes`.

        Indices of ``-1`` lie past the end of a shorter sentence. With `cells` (positions), only their rows, in
        that order; a lazy ``obsm`` computes no others. Warns when the sentences were ranked with fewer genes than
        `n_genes` (``to_sentences(n_genes=...)``): prompts would then say `n_genes` genes over shorter sentences.
        """
        c2s = self.c2s()
        ranked_with = c2s.get("params", {}).get("n_genes")
        if n_genes is not None and ranked_with is not None and ranked_with < n_genes:
            logg.warning(
                f"The sentences were ranked with `n_genes={ranked_with}`, fewer than the {n_genes} genes asked for "
                f"here: each cell gives at most {ranked_with} genes, though prompts say {n_genes}. Rank them again "
                f"with `sc_c2s.pp.to_sentences(adata, n_genes={n_genes})`, or pass `n_genes={ranked_with}` here."
            )
        ranked = self.obsm[GENES][:, :n_genes]
        if cells is not None:
            ranked = ranked[cells]
        return np.asarray(c2s["genes"], dtype=object), np.asarray(ranked)

    def check_columns(self, **keys: str | Sequence[str] | None) -> None:
        """Refuse, saying how to copy it, a column the verb reads that only ``mdata.obs`` holds, not the modality.

        Each keyword names an argument and its column (or columns, or ``None``).
        """
        if not self.is_mudata:
            return
        for arg, value in keys.items():
            for key in [] if value is None else [value] if isinstance(value, Hashable) else value:
                if isinstance(key, Hashable) and key not in self.adata.obs and key in self.data.obs:
                    msg = (
                        f"`{arg}={key!r}` is a column of `mdata.obs`, while sc_c2s reads the obs of the {self.mod!r} "
                        f"modality: copy it there, `mdata.mod[{self.mod!r}].obs[{key!r}] = mdata.obs[{key!r}]`."
                    )
                    raise KeyError(msg)

    def save(self, attr: str, key: str, value: Any) -> None:
        """Write one result into ``obs``, ``obsm`` or ``uns``; ``obs`` columns are mirrored into ``mdata.obs``."""
        getattr(self.adata, attr)[key] = value
        if attr == "obs" and self.is_mudata:
            self.data.obs[f"{self.mod}:{key}"] = self.adata.obs[key].reindex(self.data.obs_names)

    def remove(self, attr: str, key: str, *, why: str) -> None:
        """Delete an earlier result from ``obs``, ``obsm`` or ``uns`` (and its mirror in ``mdata.obs``) and log it."""
        if key not in getattr(self.adata, attr):
            return
        del getattr(self.adata, attr)[key]
        if attr == "obs" and self.is_mudata and f"{self.mod}:{key}" in self.data.obs:
            del self.data.obs[f"{self.mod}:{key}"]
        logg.info(f"    removed {key!r}, {self._where}{attr} ({why})")

    def save_all(self, results: dict[tuple[str, str], Any], *, start: Any) -> None:
        """Write several results and log them the way scanpy does (``added`` plus where each went)."""
        for (attr, key), value in results.items():
            self.save(attr, key, value)
        added = ",\n    ".join(f"{key!r}, {self._where}{attr}" for attr, key in results)
        logg.info("    finished", time=start, deep=f"added\n    {added}")

    @property
    def _where(self) -> str:
        """Prefix of the results' places in log messages."""
        return f"mdata.mod[{self.mod!r}]." if self.is_mudata else "adata."


def _checked(matrix: Matrix) -> Matrix:
    """Refuse a matrix whose values are not real numbers."""
    check_expression_dtype(matrix.X, matrix.source)
    return matrix


def check_writable(data: AnnData | MuData, *, copy: bool) -> None:
    """Refuse to write into a view of a backed AnnData, or a copy or view of a backed MuData.

    anndata cannot make such a view an object of its own in memory, and mudata copies a backed MuData only into
    another file. Verbs call it before their work, so that the error comes at once; :func:`prepare` calls it too.
    `copy` itself must be a boolean: ``copy="False"`` would return a copy and leave `data` without results.
    """
    check_flag(copy, "copy")
    if not copy and isinstance(data, AnnData) and data.is_view and data.isbacked:
        msg = (
            "This is a view of a backed AnnData (e.g. `adata[:100]` of `read_h5ad(..., backed='r')`), which cannot "
            "hold results: pass `copy=True` to get them in an in-memory copy, or load the cells first with "
            "`adata = adata.to_memory()`."
        )
        raise ValueError(msg)
    if _is_mudata(data) and data.isbacked and (copy or data.is_view):
        msg = (
            "This MuData is backed by its .h5mu file (`read_h5mu(..., backed=True)`), and mudata copies it, or a view "
            "of it, only into another file: write the results into it in place (`copy=False`, not on a view), or "
            "load it into memory first with `mudata.read_h5mu(path)`."
        )
        raise ValueError(msg)


def prepare(data: AnnData | MuData, *, copy: bool = False, stacklevel: int = 3) -> AnnData | MuData:
    """Return the object to write into: a copy when asked, otherwise the user's object.

    A view is made an object of its own first, with scanpy's warning (at `stacklevel`: the caller of the verb):
    the results go into it, not into the object it views. The copy of a backed AnnData is loaded into memory; the
    file is not touched.
    """
    check_writable(data, copy=copy)
    if copy:
        return data.to_memory() if isinstance(data, AnnData) and data.isbacked else data.copy()
    if data.is_view:
        kind = "an AnnData" if isinstance(data, AnnData) else "a MuData"
        warnings.warn(f"Received a view of {kind}. Making a copy.", UserWarning, stacklevel=stacklevel)
        data._init_as_actual(data.copy())
    return data
