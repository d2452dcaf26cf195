from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg
from scipy import sparse
from scipy.spatial.distance import cdist, pdist

from sc_c2s import _keys
from sc_c2s._data import DataHandler
from sc_c2s._docs import doc_mod, doc_params, doc_seed
from sc_c2s._utils._validate import (
    LEGACY_SEED_LIMIT,
    AnyRandom,
    check_name,
    check_obs_column,
    check_positive_int,
    check_random_state,
)
from sc_c2s.tl._from_sentences import _text, reconstruct, reconstruct_ranked
from sc_c2s.tl._utils import warn_unknown

if TYPE_CHECKING:
    from mudata import MuData
    from sklearn.neighbors import NearestNeighbors

#: Real cells a type needs to be scored: two per half, so that each half has a spread to compare against.
MIN_REAL_CELLS = 4
#: Cells sampled to pick the RBF bandwidth (median pairwise distance).
_BANDWIDTH_CELLS = 1000
#: Columns of the result, in order.
COLUMNS = [
    "n_real",
    "n_generated",
    "knn_recovery",
    "knn_recovery_control",
    "pearson",
    "pearson_control",
    "mmd",
    "mmd_control",
    "energy",
    "energy_control",
    "valid_rate",
    "duplicate_rate",
    "sentence_length",
    "sentence_length_real",
]


@dataclass
class Comparison:
    """Real and generated cells on one scale: their sentences read back into expression over the same genes."""

    real: sparse.csr_matrix
    """Real cells × genes: their top `n_genes` sentence genes through the rank fit."""
    generated: sparse.csr_matrix
    """Generated cells × the same genes: their sentences through the same rank fit."""
    real_labels: np.ndarray
    generated_labels: np.ndarray
    generated_counts: pd.DataFrame
    """``n_valid_genes``, ``n_unknown_words``, ``n_duplicate_genes`` of each generated cell against the real genes."""
    real_lengths: np.ndarray
    """Genes in each real cell's sentence."""
    n_genes: int


def comparison(
    real: AnnData | MuData,
    generated: AnnData,
    *,
    label_key: str,
    generated_key: str = _keys.GENERATED_CELL_TYPE,
    n_genes: int | None = None,
    mod: str | None = None,
) -> Comparison:
    """Put real and generated cells on the same scale (see :func:`score_generation`)."""
    handler = DataHandler(real, mod)
    check_real(handler)
    c2s = handler.c2s()
    handler.check_columns(label_key=label_key)
    check_obs_column(handler.obs, label_key, arg="label_key", where="the real cells' obs")
    check_returned(generated, arg="generated", verb="sc_c2s.tl.generate")
    check_name(generated_key, "generated_key", what="column of the generated cells' obs")
    for key in (_keys.SENTENCE, generated_key):
        if key not in generated.obs.columns:
            msg = f"The generated cells have no obs[{key!r}]; pass the AnnData returned by `sc_c2s.tl.generate`" + (
                " (or set `generated_key=`)." if key == generated_key else FROM_SENTENCES_HINT
            )
            raise KeyError(msg)
    params = generated.uns.get(_keys.GENERATE, {}).get("params", {})
    n_genes = compared_genes(n_genes, params, generated.obs[_keys.SENTENCE], key=_keys.GENERATE)
    fit = params.get("rank_fit", c2s.get("rank_fit"))
    if fit is None:
        msg = "No rank fit in the generated cells' params nor in the real cells' `uns['c2s']`; run `to_sentences`."
        raise KeyError(msg)
    genes, ranked = handler.ranked(n_genes)
    generated_cells = reconstruct(generated.obs[_keys.SENTENCE].tolist(), genes=genes, rank_fit=fit)
    check_shared_genes(generated_cells.obs, generated.obs[_keys.SENTENCE])
    return Comparison(
        real=reconstruct_ranked(ranked, genes=genes, rank_fit=fit),
        generated=generated_cells.X,
        real_labels=_labels(handler.obs[label_key]),
        generated_labels=generated.obs[generated_key].astype(str).to_numpy(),
        generated_counts=generated_cells.obs,
        real_lengths=(ranked >= 0).sum(axis=1),
        n_genes=n_genes,
    )


#: How cells that `sc_c2s.tl.from_sentences` read get the column of sentences the scores read.
FROM_SENTENCES_HINT = (
    ", or for cells read with `sc_c2s.tl.from_sentences`, set their obs['c2s_sentence'] to the sentences they were "
    "read from."
)


def _labels(column: pd.Series) -> np.ndarray:
    """Return the labels as strings, ``None`` for cells without one (which then belong to no type)."""
    return np.where(column.notna().to_numpy(), column.astype(str).to_numpy(), None)


def compared_genes(n_genes: int | None, params: dict, sentences: pd.Series, *, key: str) -> int:
    """Genes per real sentence: `n_genes`, else the number the written cells record in their `params`.

    Cells that lost their record (``uns[key]``, e.g. in :func:`anndata.concat`) are compared through as many genes
    as their longest sentence, with a warning.
    """
    n_genes = check_positive_int(n_genes, "n_genes", none_ok=True)
    if n_genes is not None:
        return n_genes
    if "n_genes" in params:
        return int(params["n_genes"])
    longest = max((len(_text(sentence).split()) for sentence in sentences), default=0)
    if not longest:  # nothing to compare: refused with its own message
        return 1
    warnings.warn(
        f"The cells to score do not record how many genes they were written with (`uns[{key!r}]`, which "
        f"`anndata.concat` drops); real cells are read through {longest} genes, as many as the longest "
        "written sentence. Pass `n_genes=` to set it.",
        UserWarning,
        stacklevel=4,
    )
    return longest


def check_real(handler: DataHandler) -> None:
    """Refuse real cells that look like generated ones (the arguments swapped) with a message saying so."""
    if _keys.C2S in handler.uns:
        return
    if _keys.GENERATE in handler.uns or (_keys.SENTENCE in handler.obs and _keys.GENES not in handler.obsm):
        msg = (
            f"`real` looks like generated cells (sentences in obs[{_keys.SENTENCE!r}] without ranked genes, as "
            "`sc_c2s.tl.generate` returns them); pass the real cells first and the generated ones second."
        )
        raise ValueError(msg)


def check_returned(cells: object, *, arg: str, verb: str) -> None:
    """Refuse `cells` (the argument `arg`) unless it is an AnnData, as `verb`, which made the cells scored, returns."""
    if not isinstance(cells, AnnData):
        msg = f"`{arg}` must be the AnnData returned by `{verb}`, got {type(cells).__name__}."
        raise TypeError(msg)


def check_shared_genes(counts: pd.DataFrame, sentences: pd.Series) -> None:
    """Refuse generated sentences none of whose words is a gene of the real cells: there is nothing to compare.

    Warn where most are not: the scores then compare other genes than the cells were generated over.
    """
    n_words = int(counts.to_numpy().sum())
    if counts["n_valid_genes"].sum() > 0:
        warn_unknown(
            int(counts["n_unknown_words"].sum()),
            n_words,
            what="the words of the generated sentences are not genes of the real cells",
            fix="score the cells against the data they were generated for, or real cells ranked with the same gene "
            "names (see `gene_symbols=` of `sc_c2s.pp.to_sentences`)",
        )
        return
    if n_words == 0:
        msg = "The generated cells' sentences (obs['c2s_sentence']) hold no words; there is nothing to score."
        raise ValueError(msg)
    example = next(text for text in map(_text, sentences) if text.split())
    msg = (
        f"None of the {n_words} words of the generated sentences is a gene of the real cells (e.g. "
        f"{' '.join(example.split()[:3])!r}): they use other gene names. Score the cells against the data they were "
        "generated for (the `adata` passed to `sc_c2s.tl.generate`), or real cells ranked with the same gene names "
        "(see `gene_symbols=` of `sc_c2s.pp.to_sentences`)."
    )
    raise ValueError(msg)


def pca(X: sparse.csr_matrix, n_comps: int, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal axes (``n_comps`` × genes) of `X`, without densifying it."""
    import scanpy as sc

    if min(X.shape) < 2:
        msg = (
            "A PCA needs at least two cells and two genes; the real cells compared here are "
            f"{X.shape[0]} × {X.shape[1]}."
        )
        raise ValueError(msg)
    n_comps = max(1, min(n_comps, X.shape[0] - 1, X.shape[1] - 1))
    _, components, _, _ = sc.pp.pca(X, n_comps=n_comps, return_info=True, random_state=random_state)
    return np.asarray(X.mean(axis=0)).ravel(), components


def project(X: sparse.csr_matrix, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Coordinates of the rows of `X` on the principal axes."""
    return np.asarray(X @ components.T) - mean @ components.T


@doc_params(doc_mod=doc_mod, doc_seed=doc_seed)
def score_generation(
    real: AnnData | MuData,
    generated: AnnData,
    *,
    label_key: str,
    generated_key: str = _keys.GENERATED_CELL_TYPE,
    n_genes: int | None = None,
    n_comps: int = 50,
    n_neighbors: int = 10,
    max_cells: int = 1000,
    random_state: AnyRandom = 0,
    mod: str | None = None,
) -> pd.DataFrame:
    """Score generated cells against real cells of the same types, beside a real-vs-real control.

    **Scale.** Both sides are read the same way: each real cell's top `n_genes` sentence genes and each
    generated sentence become expression through :func:`sc_c2s.tl.from_sentences` over the real cells' genes
    with one rank fit (the one :func:`sc_c2s.tl.generate` used, else the real cells'). So values are
    ``log10(1 + x)`` of counts normalised to the median library size, and a generator that writes sentences
    exactly like the real ones scores like the control whatever the error of the rank fit.

    **Control.** The real cells of each type are split at random into halves: a reference half R and a control
    half C. Every metric compares the reference half with the generated cells G and, computed the same way, with
    C. The distributional metrics use the same number of cells on both sides (the smaller of C and G), so
    their sample-size bias is the same. Every real type with at least four cells has its reference half, whether
    or not it was generated: the PCA space, the kernel width and the classifier below are fit on all of them, so
    they do not depend on which types were generated.

    Metrics per cell type:

    ``knn_recovery``
        Share of G whose label a k-nearest-neighbour classifier, fit on R of all real types in a PCA space fit on
        R, predicts as their requested type (control: the share of C). The classifier takes its neighbours' most
        frequent label, and among labels equally frequent the one of the nearest neighbour, so that ties favour no
        type.
    ``pearson``
        Pearson correlation over genes between the mean expression of G and of R (control: C and R).
    ``mmd``
        Maximum mean discrepancy (the square root of the biased estimate of MMD²) between G and R in the PCA
        space, with a Gaussian kernel whose width is the median distance between reference cells, R of all types
        pooled (at most 1,000 of them, sampled), so that every type is measured with one kernel (control: C and R).
    ``energy``
        Energy distance (the square root of the biased estimate of ``2E|G−R| − E|G−G'| − E|R−R'|``) in the PCA
        space (control: C and R).
    ``valid_rate``, ``duplicate_rate``
        Share of generated words that are genes of the real cells named for the first time in their sentence (the
        words :func:`~sc_c2s.tl.from_sentences` keeps), and share that repeat a gene named before.
    ``sentence_length``, ``sentence_length_real``
        Mean words per generated sentence, and mean genes per real sentence (at most `n_genes`).

    Types of G absent from the real cells, and types with fewer than four real cells (two per half), are left out
    with a warning; real cells without a label belong to no type. The row ``"overall"`` holds the sums of the
    counts and the means over types of the rest.

    Parameters
    ----------
    real
        Real cells that went through :func:`sc_c2s.pp.to_sentences`.
    generated
        Cells from :func:`sc_c2s.tl.generate`: ``obs["c2s_sentence"]`` and the requested type.
    label_key
        Column of the real cells' ``obs`` with their types.
    generated_key
        Column of the generated cells' ``obs`` with their types.
    n_genes
        Genes per real sentence; ``None`` takes the `n_genes` of :func:`~sc_c2s.tl.generate` (the most it asked
        for, the model's unless given; each cell type may have been asked for fewer), or for
        generated cells that lost that record (``uns["c2s_generate"]``, e.g. in :func:`anndata.concat`) the length
        of their longest sentence, with a warning.
    n_comps
        Principal components of the space of the kNN classifier, MMD and energy distance.
    n_neighbors
        Neighbours of the kNN classifier.
    max_cells
        At most this many cells per type and side (sampled with `random_state`), which bounds the memory of the
        distance matrices; at least 2.
    random_state
        Seed of the split into halves, of the subsampling and of the PCA {doc_seed}; below ``2**32``, as
        scanpy's PCA takes it.
    {doc_mod}

    Returns
    -------
    A DataFrame with one row per cell type and a row ``"overall"``, and the columns ``n_real``,
    ``n_generated`` (cells compared), then the four population metrics (``knn_recovery``, ``pearson``, ``mmd``,
    ``energy``) each beside its ``*_control``, then ``valid_rate``, ``duplicate_rate``, ``sentence_length`` and
    ``sentence_length_real``. ``scores.attrs["random_state"]`` is the seed used (the one drawn for ``None``).

    Raises
    ------
    KeyError
        If `label_key` or `generated_key` is not a column, or the real cells have no sentences.
    ValueError
        If no generated type has enough real cells, or no generated word is a gene of the real cells (the
        generated cells use other gene names).

    Examples
    --------
    >>> import scanpy as sc
    >>> import sc_c2s
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> sc_c2s.pp.to_sentences(adata)
    >>> generated = sc_c2s.tl.generate(adata, model="demo", cell_types={{"CD14+ Monocyte": 20, "CD19+ B": 20}})
    >>> scores = sc_c2s.tl.score_generation(adata, generated, label_key="bulk_labels")
    >>> scores.loc["overall", ["knn_recovery", "knn_recovery_control"]].shape
    (2,)
    """
    from sklearn.neighbors import NearestNeighbors

    start = logg.info("scoring generated cells")
    for value, name in ((n_comps, "n_comps"), (n_neighbors, "n_neighbors"), (max_cells, "max_cells")):
        check_positive_int(value, name)
    if max_cells < MIN_REAL_CELLS // 2:
        msg = (
            f"`max_cells` must be at least {MIN_REAL_CELLS // 2}, got {max_cells}: it bounds the cells of each type "
            "and side, and each half of a type's real cells needs a spread to compare against."
        )
        raise ValueError(msg)
    random_state = check_random_state(random_state, limit=LEGACY_SEED_LIMIT)
    data = comparison(real, generated, label_key=label_key, generated_key=generated_key, n_genes=n_genes, mod=mod)
    types = _types(data)

    # each draw from a stream of its own, so that no type's cells depend on which types were generated, or in what order
    real_types = _real_types(data)
    halves = {
        t: _split(np.flatnonzero(data.real_labels == t), max_cells, named_rng(random_state, "real", t))
        for t in real_types
    }
    gen = {
        t: named_rng(random_state, "generated", t).permutation(np.flatnonzero(data.generated_labels == t))[:max_cells]
        for t in types
    }
    reference = np.concatenate([halves[t][0] for t in real_types])
    mean, components = pca(data.real[reference], n_comps, random_state)
    real_pcs = project(data.real, mean, components)
    gen_pcs = project(data.generated, mean, components)
    sample = named_rng(random_state, "bandwidth").permutation(reference)[:_BANDWIDTH_CELLS]
    bandwidth = float(np.median(pdist(real_pcs[sample]))) or 1.0
    knn = NearestNeighbors(n_neighbors=min(n_neighbors, len(reference))).fit(real_pcs[reference])
    codes, names = pd.factorize(data.real_labels[reference])

    rows = {}
    for t in types:
        ref, control = halves[t]
        g = gen[t]
        m = min(len(control), len(g))
        counts = data.generated_counts.iloc[g].sum()
        n_words = counts.sum()
        rows[t] = {
            "n_real": len(ref) + len(control),
            "n_generated": len(g),
            "knn_recovery": float(np.mean(_vote(knn, codes, names, gen_pcs[g]) == t)),
            "knn_recovery_control": float(np.mean(_vote(knn, codes, names, real_pcs[control]) == t)),
            "pearson": _pearson(data.generated[g], data.real[ref]),
            "pearson_control": _pearson(data.real[control], data.real[ref]),
            "mmd": mmd(gen_pcs[g[:m]], real_pcs[ref], bandwidth),
            "mmd_control": mmd(real_pcs[control[:m]], real_pcs[ref], bandwidth),
            "energy": _energy(gen_pcs[g[:m]], real_pcs[ref]),
            "energy_control": _energy(real_pcs[control[:m]], real_pcs[ref]),
            "valid_rate": counts["n_valid_genes"] / n_words if n_words else np.nan,
            "duplicate_rate": counts["n_duplicate_genes"] / n_words if n_words else np.nan,
            "sentence_length": n_words / len(g),
            "sentence_length_real": float(np.mean(data.real_lengths[np.concatenate([ref, control])])),
        }
    scores = pd.DataFrame.from_dict(rows, orient="index", columns=COLUMNS)
    overall = scores.mean()
    overall[["n_real", "n_generated"]] = scores[["n_real", "n_generated"]].sum()
    scores.loc["overall"] = overall
    scores[["n_real", "n_generated"]] = scores[["n_real", "n_generated"]].astype(int)
    scores.index.name = "cell_type"
    scores.attrs["random_state"] = random_state
    logg.info("    finished", time=start)
    return scores


def named_rng(random_state: int, *names: str) -> np.random.Generator:
    """Return a generator seeded by `random_state` and `names`: the same names draw the same, whatever else is drawn."""
    return np.random.default_rng([random_state, *(zlib.crc32(name.encode()) for name in names)])


def _types(data: Comparison) -> list[str]:
    """Types present on both sides with enough real cells, in the order of the generated cells."""
    real = pd.Series(data.real_labels).value_counts()
    requested = list(dict.fromkeys(data.generated_labels))
    absent = [t for t in requested if real.get(t, 0) == 0]
    few = [t for t in requested if 0 < real.get(t, 0) < MIN_REAL_CELLS]
    if absent or few:
        warnings.warn(
            f"Left out generated cell types with no real cells {absent} or fewer than {MIN_REAL_CELLS} {few}.",
            UserWarning,
            stacklevel=3,
        )
    types = [t for t in requested if real.get(t, 0) >= MIN_REAL_CELLS]
    if not types:
        msg = (
            f"No generated cell type is a type of the real cells with at least {MIN_REAL_CELLS} cells; check "
            f"`label_key` and `generated_key`. Real types: {sorted(real.index)[:20]}."
        )
        raise ValueError(msg)
    return types


def _real_types(data: Comparison) -> list[str]:
    """Real types with enough cells, generated or not, sorted: the classifier chooses among all of them."""
    real = pd.Series(data.real_labels).value_counts()
    return sorted(t for t, n in real.items() if n >= MIN_REAL_CELLS)


def _split(cells: np.ndarray, max_cells: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split `cells` at random into a reference half and a control half, each at most `max_cells` long."""
    cells = rng.permutation(cells)
    half = (len(cells) + 1) // 2
    return cells[:half][:max_cells], cells[half:][:max_cells]


def _vote(knn: NearestNeighbors, codes: np.ndarray, names: pd.Index, points: np.ndarray) -> np.ndarray:
    """Label of each point by its neighbours among the cells `knn` was fit on (whose labels are `names[codes]`).

    The most frequent label wins; among labels equally frequent, the one of the nearest neighbour (sklearn's
    classifier takes the first in sorted order, which favours some types over others).
    """
    neighbours = codes[knn.kneighbors(points, return_distance=False)]  # points × k, nearest first
    votes = np.apply_along_axis(np.bincount, 1, neighbours, minlength=len(names))
    winner = np.take_along_axis(votes, neighbours, axis=1) == votes.max(axis=1, keepdims=True)
    return np.asarray(names)[neighbours[np.arange(len(points)), winner.argmax(axis=1)]]


def _pearson(a: sparse.csr_matrix, b: sparse.csr_matrix) -> float:
    """Pearson correlation over genes of the mean expression of the rows of `a` and of `b`."""
    mean_a, mean_b = np.asarray(a.mean(axis=0)).ravel(), np.asarray(b.mean(axis=0)).ravel()
    if np.ptp(mean_a) == 0 or np.ptp(mean_b) == 0:
        return np.nan
    return float(np.corrcoef(mean_a, mean_b)[0, 1])


def mmd(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Square root of the biased MMD² between the rows of `x` and `y` with a Gaussian kernel."""

    def kernel(a, b):
        return np.exp(-cdist(a, b, "sqeuclidean") / (2 * bandwidth**2)).mean()

    if len(x) == 0 or len(y) == 0:
        return np.nan
    return float(np.sqrt(max(kernel(x, x) + kernel(y, y) - 2 * kernel(x, y), 0.0)))


def _energy(x: np.ndarray, y: np.ndarray) -> float:
    """Square root of the biased energy distance between the rows of `x` and `y`."""
    if len(x) == 0 or len(y) == 0:
        return np.nan
    value = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    return float(np.sqrt(max(value, 0.0)))
