from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scanpy import logging as logg
from scipy import sparse
from scipy.spatial.distance import pdist

from sc_c2s import _keys
from sc_c2s._data import DataHandler
from sc_c2s._docs import doc_mod, doc_params, doc_seed
from sc_c2s._utils._validate import (
    LEGACY_SEED_LIMIT,
    AnyRandom,
    check_obs_column,
    check_positive_int,
    check_random_state,
)

from ._from_sentences import reconstruct, reconstruct_ranked
from ._pairs import conditions
from ._score_generation import (
    FROM_SENTENCES_HINT,
    check_returned,
    check_shared_genes,
    compared_genes,
    mmd,
    named_rng,
    pca,
    project,
)
from ._utils import UNKNOWN_WARNING

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

#: Top differentially expressed genes of the R² and of the direction agreement.
N_TOP_R2, N_TOP_DIRECTION = 100, 20
#: Real cells a group needs on each side (perturbed, control) to be scored.
MIN_CELLS = 2
#: What is compared with the real perturbed cells: the prediction and the two baselines (column suffixes).
SOURCES = {"predicted": "", "unchanged": "_unchanged", "mean_shift": "_mean_shift"}
#: Metrics, each in a column per source.
METRICS = ("r2_all", f"r2_top{N_TOP_R2}", f"direction_top{N_TOP_DIRECTION}", "mmd")
COLUMNS = ["n_perturbed", "n_control", "n_predicted"] + [m + s for m in METRICS for s in SOURCES.values()]


@dataclass
class Cells:
    """Real and predicted cells on one scale: their sentences read back into expression over the real genes.

    Cells without a group are left out. Groups and conditions are compared as strings, `control` too, so that the
    value ``1`` of an integer column is the perturbation ``"1"`` that a prediction names.
    """

    real: sparse.csr_matrix
    predicted: sparse.csr_matrix
    real_groups: np.ndarray
    real_conditions: np.ndarray
    predicted_groups: np.ndarray
    predicted_conditions: np.ndarray
    genes: np.ndarray
    control: str
    group_values: dict[str, Any]
    """The real cells' own value of each group, by its string."""
    condition_values: dict[str, Any]
    """The real cells' own value of each condition, by its string."""
    _real_rows: dict[tuple[str, str], np.ndarray] = field(init=False, repr=False)
    _predicted_rows: dict[tuple[str, str], np.ndarray] = field(init=False, repr=False)
    _means: dict[tuple[str, str], np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        # the cells of each group and condition, found once: every pair scored looks up those of all groups
        self._real_rows = _rows(self.real_groups, self.real_conditions)
        self._predicted_rows = _rows(self.predicted_groups, self.predicted_conditions)

    @cached_property
    def groups(self) -> np.ndarray:
        """The groups of the real cells, sorted."""
        return np.unique(self.real_groups)

    def real_cells(self, group: str, condition: str) -> sparse.csr_matrix:
        """Real cells of `group` in `condition`."""
        return self.real[self._real_rows.get((group, condition), np.empty(0, dtype=np.intp))]

    def predicted_cells(self, group: str, condition: str) -> sparse.csr_matrix:
        """Predicted cells of `group` in `condition`."""
        return self.predicted[self._predicted_rows.get((group, condition), np.empty(0, dtype=np.intp))]

    def real_mean(self, group: str, condition: str) -> np.ndarray:
        """Mean expression of the real cells of `group` in `condition` (``nan`` for none), computed once."""
        if (group, condition) not in self._means:
            self._means[group, condition] = _mean(self.real_cells(group, condition))
        return self._means[group, condition]

    def n_real(self, group: str, condition: str) -> int:
        """Real cells of `group` in `condition`."""
        return len(self._real_rows.get((group, condition), ()))

    def compared(self, group: str, perturbation: str) -> bool:
        """Whether `group` has the real perturbed and control cells to compare: :data:`MIN_CELLS` of each."""
        return min(self.n_real(group, perturbation), self.n_real(group, self.control)) >= MIN_CELLS


@dataclass
class Contrast:
    """One group and perturbation: the cells of each side, and the gene means with the DE statistic."""

    perturbed: sparse.csr_matrix
    """Real perturbed cells of the group."""
    control: sparse.csr_matrix
    """Real control cells of the group."""
    predicted: sparse.csr_matrix
    """Predicted perturbed cells of the group."""
    shift: np.ndarray
    """The average perturbed − control difference of the other groups (``nan`` where there are none)."""
    means: pd.DataFrame
    """Per gene: mean of the real perturbed cells (``real``), of the ``predicted`` cells, of the control cells
    (``unchanged``), control + `shift` (``mean_shift``), and Welch's t of real perturbed vs control (``t``)."""

    def top(self, n: int) -> pd.DataFrame:
        """Return the `n` genes of largest ``|t|``: the top differentially expressed ones.

        Genes whose ``|t|`` differ by rounding only tie (every gene of a single cell has ``|t| = 1``, up to an ulp),
        and ties go to the gene that comes first.
        """
        order = np.argsort(-np.round(np.abs(self.means["t"].to_numpy()), 10), kind="stable")[:n]
        return self.means.iloc[order]


def cells(
    real: AnnData | MuData,
    predicted: AnnData,
    *,
    condition_key: str,
    control: str,
    groupby: str,
    n_genes: int | None = None,
    mod: str | None = None,
) -> Cells:
    """Put real and predicted cells on the same scale (see :func:`score_perturbation`)."""
    handler = DataHandler(real, mod)
    c2s = handler.c2s()
    handler.check_columns(condition_key=condition_key, groupby=groupby)
    real_conditions = conditions(handler.obs, condition_key=condition_key, control=control).to_numpy()
    real_groups = check_obs_column(handler.obs, groupby, arg="groupby", where="the real cells' obs")
    check_returned(predicted, arg="predicted", verb="sc_c2s.tl.predict_perturbation")
    for key in (_keys.SENTENCE, condition_key, groupby):
        if key not in predicted.obs.columns:
            msg = (
                f"The predicted cells have no obs[{key!r}]; pass the AnnData returned by "
                "`sc_c2s.tl.predict_perturbation` with the same `condition_key` and `groupby`"
                + (FROM_SENTENCES_HINT if key == _keys.SENTENCE else ".")
            )
            raise KeyError(msg)
    params = predicted.uns.get(_keys.PREDICT_PERTURBATION, {}).get("params", {})
    n_genes = compared_genes(n_genes, params, predicted.obs[_keys.SENTENCE], key=_keys.PREDICT_PERTURBATION)
    fit = params.get("rank_fit", c2s.get("rank_fit"))
    if fit is None:
        msg = "No rank fit in the predicted cells' params nor in the real cells' `uns['c2s']`; run `to_sentences`."
        raise KeyError(msg)
    genes, ranked = handler.ranked(n_genes)
    real_cells = reconstruct_ranked(ranked, genes=genes, rank_fit=fit)
    predicted_cells = reconstruct(predicted.obs[_keys.SENTENCE].tolist(), genes=genes, rank_fit=fit)
    check_shared_genes(predicted_cells.obs, predicted.obs[_keys.SENTENCE])
    _warn_unknown_words(predicted_cells.obs)
    predicted_groups = predicted.obs[groupby]
    real_kept, predicted_kept = real_groups.notna().to_numpy(), predicted_groups.notna().to_numpy()
    if not (real_kept.all() and predicted_kept.all()):
        warnings.warn(
            f"Left out {int((~real_kept).sum())} real and {int((~predicted_kept).sum())} predicted cells without "
            f"a value in obs[{groupby!r}].",
            UserWarning,
            stacklevel=3,
        )
    return Cells(
        real=real_cells[real_kept],
        predicted=sparse.csr_matrix(predicted_cells.X)[predicted_kept],
        real_groups=real_groups[real_kept].astype(str).to_numpy(),
        real_conditions=real_conditions[real_kept],
        predicted_groups=predicted_groups[predicted_kept].astype(str).to_numpy(),
        predicted_conditions=predicted.obs[condition_key][predicted_kept].astype(str).to_numpy(),
        genes=genes,
        control=str(control),
        group_values=_own_values(real_groups[real_kept]),
        condition_values=_own_values(handler.obs[condition_key]),
    )


def _own_values(column: pd.Series) -> dict[str, Any]:
    """Each distinct value of `column` by its string, the form in which values are compared."""
    values = column.dropna().drop_duplicates()
    return dict(zip(values.astype(str), values, strict=True))


def _warn_unknown_words(counts: pd.DataFrame) -> None:
    """Warn when most words of the predicted sentences are not genes of the real cells: they are left out."""
    n_unknown, n_valid = int(counts["n_unknown_words"].sum()), int(counts["n_valid_genes"].sum())
    share = n_unknown / max(n_unknown + n_valid, 1)
    if share > UNKNOWN_WARNING:
        warnings.warn(
            f"{share:.0%} of the words of the predicted sentences are not genes of the real cells and are left out "
            "of the scores. Score against real cells ranked over the genes of the cells the prediction started from "
            "(the `adata` passed to `sc_c2s.tl.predict_perturbation`, before any subset of genes).",
            UserWarning,
            stacklevel=4,
        )


def contrast(data: Cells, *, group: str, perturbation: str) -> Contrast:
    """Cells and gene means of one group and perturbation, with the mean-shift baseline of the other groups.

    Raises a :class:`ValueError` if the group has fewer than :data:`MIN_CELLS` real perturbed or control cells.
    """
    if not data.compared(group, perturbation):
        msg = (
            f"Group {group!r} has too few real cells to compare: {data.n_real(group, perturbation)} of perturbation "
            f"{perturbation!r} and {data.n_real(group, data.control)} control; at least {MIN_CELLS} of each are "
            "needed. Pass both conditions' real cells, or pick another group or perturbation."
        )
        raise ValueError(msg)
    perturbed = data.real_cells(group, perturbation)
    control_cells = data.real_cells(group, data.control)
    predicted = data.predicted_cells(group, perturbation)
    differences = [
        data.real_mean(g, perturbation) - data.real_mean(g, data.control)
        for g in data.groups
        if g != group and data.compared(g, perturbation)
    ]
    shift = np.mean(differences, axis=0) if differences else np.full(len(data.genes), np.nan)
    means = pd.DataFrame(
        {
            "real": data.real_mean(group, perturbation),
            "predicted": _mean(predicted),
            "unchanged": data.real_mean(group, data.control),
            "mean_shift": data.real_mean(group, data.control) + shift,
            "t": _welch_t(perturbed, control_cells),
        },
        index=pd.Index(data.genes, name="gene"),
    )
    return Contrast(perturbed, control_cells, predicted, shift, means)


@doc_params(doc_mod=doc_mod, doc_seed=doc_seed)
def score_perturbation(
    real: AnnData | MuData,
    predicted: AnnData,
    *,
    condition_key: str,
    control: str,
    groupby: str,
    perturbation: Hashable | Sequence[Hashable] | None = None,
    n_genes: int | None = None,
    n_comps: int = 50,
    max_cells: int = 1000,
    random_state: AnyRandom = 0,
    mod: str | None = None,
) -> pd.DataFrame:
    """Score predicted perturbed cells against the real ones, per group, beside two baselines.

    **Scale.** Real and predicted cells are read the same way: each real cell's top `n_genes` sentence genes and
    each predicted sentence become expression through :func:`sc_c2s.tl.from_sentences` over the real cells'
    genes with one rank fit (the one :func:`sc_c2s.tl.predict_perturbation` used, else the real cells'): values
    are ``log10(1 + x)`` of counts normalised to the median library size, the log-normalised scale of the fit.

    **Baselines**, computed in the same call for each group: *unchanged*, the group's real control cells as they
    are; *mean shift*, those control cells plus the average difference between the mean of the real perturbed
    and the mean of the real control cells of the **other** groups (for the same perturbation; groups with at
    least two cells on each side).

    **Differentially expressed genes** of a group are those with the largest ``|t|`` of Welch's t-test between its
    real perturbed and its real control cells, on the same scale.

    Metrics per group and perturbation, for the prediction and for each baseline (columns ``*_unchanged`` and
    ``*_mean_shift``):

    ``r2_all``, ``r2_top100``
        R² (the squared Pearson correlation, as scGen reports it) between the mean expression of the compared
        cells and that of the real perturbed cells, over all genes and over the top 100 DE genes.
    ``direction_top20``
        Share of the top 20 DE genes whose mean moves from the real control cells' mean in the same direction as
        the real perturbed cells' (never for *unchanged*, which does not move), among those of the 20 that move
        (all of them but in small groups of short sentences, where fewer than 20 genes differ at all).
    ``mmd``
        Maximum mean discrepancy (square root of the biased MMD², as in :func:`sc_c2s.tl.score_generation`)
        to the real perturbed cells, in a PCA space fit on the group's real cells, with a Gaussian kernel whose
        width is the median distance between real perturbed cells. The prediction and both baselines have one
        cell per control cell when every control cell was predicted, so their sample-size bias is the same.

    Groups with fewer than two real perturbed or control cells are left out with a warning.

    Parameters
    ----------
    real
        Real cells of every group, control and perturbed, that went through :func:`sc_c2s.pp.to_sentences`.
    predicted
        Cells from :func:`sc_c2s.tl.predict_perturbation`, with ``obs[condition_key]`` and ``obs[groupby]``.
    condition_key
        Column of ``obs`` (of both) with the condition.
    control
        The value of ``obs[condition_key]`` of the real control cells.
    groupby
        Column of ``obs`` (of both) with the groups to score, e.g. the cell type.
    perturbation
        Perturbation(s) to score, as values of ``obs[condition_key]`` (compared as strings, as `control`, so
        ``1`` finds the perturbation ``"1"`` that :func:`~sc_c2s.tl.predict_perturbation` names); ``None``: every
        perturbation of the predicted cells.
    n_genes
        Genes per real sentence; ``None`` takes the `n_genes` of the prediction, or for predicted cells that lost
        that record (``uns["c2s_predict_perturbation"]``, e.g. in :func:`anndata.concat`) the length of their
        longest sentence, with a warning.
    n_comps
        Principal components of the space of the MMD.
    max_cells
        At most this many cells per side in the MMD (sampled with `random_state`); at least 2, as the kernel width
        is the median distance between real perturbed cells.
    random_state
        Seed of the subsampling and of the PCA {doc_seed}; below ``2**32``, as scanpy's PCA takes it.
    {doc_mod}

    Returns
    -------
    A DataFrame indexed by group and perturbation, as the real cells' values of ``obs[groupby]`` and
    ``obs[condition_key]`` (e.g. ``scores.loc[(1, "stimulated")]`` for an integer `groupby` column), with the
    columns ``n_perturbed``, ``n_control`` (real cells), ``n_predicted`` (all predicted cells of the group and
    perturbation, whatever `max_cells`), then each metric beside its ``*_unchanged`` and ``*_mean_shift``
    baselines. ``scores.attrs["random_state"]`` is the seed used (the one drawn for ``None``).

    Raises
    ------
    ValueError
        If a perturbation to score is not a value of the real cells' ``obs[condition_key]``, one that
        `perturbation` names is not predicted, or no group of the predicted cells has real perturbed and control
        cells to compare with.

    Examples
    --------
    With `adata` and `predicted` as in the example of :func:`sc_c2s.tl.predict_perturbation`:

    >>> import sc_c2s
    >>> scores = sc_c2s.tl.score_perturbation(
    ...     adata, predicted, condition_key="condition", control="control", groupby="cell_type"
    ... )  # doctest: +SKIP
    """
    start = logg.info("scoring predicted perturbed cells")
    check_positive_int(n_comps, "n_comps")
    check_positive_int(max_cells, "max_cells")
    if max_cells < MIN_CELLS:
        msg = (
            f"`max_cells` must be at least {MIN_CELLS}, got {max_cells}: it bounds the cells of each side in the MMD, "
            "whose kernel width is the median distance between real perturbed cells."
        )
        raise ValueError(msg)
    random_state = check_random_state(random_state, limit=LEGACY_SEED_LIMIT)
    data = cells(
        real, predicted, condition_key=condition_key, control=control, groupby=groupby, n_genes=n_genes, mod=mod
    )
    rows = {}
    for p, g in _pairs_to_score(data, condition_key=condition_key, perturbation=perturbation):
        one = contrast(data, group=g, perturbation=p)
        # each pair draws its cells from a stream of its own, so that its scores do not depend on the other pairs
        rng = named_rng(random_state, g, p)
        rows[g, p] = _scores(one, n_comps=n_comps, max_cells=max_cells, rng=rng, random_state=random_state)
    scores = pd.DataFrame.from_dict(rows, orient="index", columns=COLUMNS)
    scores.index = pd.MultiIndex.from_tuples(
        [(data.group_values[g], data.condition_values[p]) for g, p in scores.index], names=[groupby, condition_key]
    )
    scores[COLUMNS[:3]] = scores[COLUMNS[:3]].astype(int)
    scores.attrs["random_state"] = random_state
    logg.info("    finished", time=start)
    return scores


def _pairs_to_score(
    data: Cells, *, condition_key: str, perturbation: Hashable | Sequence[Hashable] | None
) -> list[tuple[str, str]]:
    """Perturbation and group of every predicted cell with enough real cells, in the order of the predicted cells.

    Raises a :class:`ValueError` if a perturbation to score is not a value of the real cells' `condition_key`, or
    one `perturbation` names is not that of any predicted cell.
    """
    if perturbation is None:
        wanted = None
    else:
        wanted = {str(p) for p in (perturbation if pd.api.types.is_list_like(perturbation) else [perturbation])}
        for missing, where, values in [
            (
                wanted - data.condition_values.keys(),
                f"values of the real cells' obs[{condition_key!r}]",
                data.condition_values,
            ),
            (wanted - set(data.predicted_conditions), "perturbations of any predicted cell", data.predicted_conditions),
        ]:
            if missing:
                msg = f"`perturbation` names {sorted(missing)}, not {where}: {sorted(set(values))[:20]}."
                raise ValueError(msg)
    pairs = list(dict.fromkeys(zip(data.predicted_conditions, data.predicted_groups, strict=True)))
    pairs = [(p, g) for p, g in pairs if wanted is None or p in wanted]
    unknown = sorted({p for p, _ in pairs} - data.condition_values.keys())
    if unknown:
        msg = (
            f"The predicted perturbations {unknown} are not values of the real cells' obs[{condition_key!r}]; values: "
            f"{sorted(data.condition_values)[:20]}. Name the perturbations alike in both, or pass `perturbation=` to "
            "score only the others."
        )
        raise ValueError(msg)
    few = [(p, g) for p, g in pairs if not data.compared(g, p)]
    if few:
        warnings.warn(
            f"Left out (perturbation, group) pairs with fewer than {MIN_CELLS} real perturbed or control cells: {few}.",
            UserWarning,
            stacklevel=3,
        )
    pairs = [pair for pair in pairs if pair not in few]
    if not pairs:
        msg = (
            "No predicted perturbation and group has real perturbed and control cells to compare with; check "
            f"`condition_key`, `control`, `groupby` and `perturbation` ({perturbation!r})."
        )
        raise ValueError(msg)
    return pairs


def _scores(
    one: Contrast, *, n_comps: int, max_cells: int, rng: np.random.Generator, random_state: int
) -> dict[str, float]:
    means = one.means
    top_r2, top_direction = one.top(N_TOP_R2), one.top(N_TOP_DIRECTION)
    real_moves = np.sign(top_direction["t"])  # 0 exactly where nothing moves, unlike means an ulp apart
    moving = real_moves.to_numpy() != 0
    perturbed, control, predicted = (_at_most(X, max_cells, rng) for X in (one.perturbed, one.control, one.predicted))
    mean, components = pca(sparse.vstack([perturbed, control]).tocsr(), n_comps, random_state)
    reference = project(perturbed, mean, components)
    bandwidth = float(np.median(pdist(reference))) or 1.0
    control_pcs = project(control, mean, components)
    compared = {
        "predicted": project(predicted, mean, components),
        "unchanged": control_pcs,
        "mean_shift": control_pcs + (one.shift @ components.T if np.isfinite(one.shift).all() else np.nan),
    }
    row = {
        "n_perturbed": one.perturbed.shape[0],
        "n_control": one.control.shape[0],
        "n_predicted": one.predicted.shape[0],
    }
    for source, suffix in SOURCES.items():
        row["r2_all" + suffix] = _r2(means[source], means["real"])
        row[f"r2_top{N_TOP_R2}" + suffix] = _r2(top_r2[source], top_r2["real"])
        moves = np.sign(top_direction[source] - top_direction["unchanged"])
        row[f"direction_top{N_TOP_DIRECTION}" + suffix] = (
            np.nan  # no mean shift to take, or no gene that moves
            if np.isnan(moves).any() or not moving.any()
            else float(np.mean((moves == real_moves)[moving]))
        )
        pcs = compared[source]
        row["mmd" + suffix] = np.nan if np.isnan(pcs).any() else mmd(pcs, reference, bandwidth)
    return row


def _at_most(X: sparse.csr_matrix, max_cells: int, rng: np.random.Generator) -> sparse.csr_matrix:
    """All the cells of `X`, in order, or a random `max_cells` of them where it has more."""
    return X if X.shape[0] <= max_cells else X[rng.permutation(X.shape[0])[:max_cells]]


def _rows(groups: np.ndarray, conditions: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Rows of each (group, condition), in order."""
    table = pd.DataFrame({"group": groups, "condition": conditions})
    return {key: np.asarray(rows) for key, rows in table.groupby(["group", "condition"], sort=False).indices.items()}


def _mean(X: sparse.csr_matrix) -> np.ndarray:
    return np.asarray(X.mean(axis=0)).ravel() if X.shape[0] else np.full(X.shape[1], np.nan)


def _welch_t(a: sparse.csr_matrix, b: sparse.csr_matrix) -> np.ndarray:
    """Welch's t of the columns of `a` against those of `b` (each with cells), in float64.

    Where neither has any spread (every cell at one value), t is its limit, decided on the values themselves, not
    on means that rounding can set an ulp apart: ``±inf`` where the two values differ (the strongest difference
    there is, e.g. a gene in every perturbed cell at one level and in no control cell), ``0`` where they are equal.
    """
    a, b = (sparse.csr_matrix(X, dtype=np.float64) for X in (a, b))
    (mean_a, var_a), (mean_b, var_b) = (_mean_var(X) for X in (a, b))
    (low_a, high_a), (low_b, high_b) = (
        (X.min(axis=0).toarray().ravel(), X.max(axis=0).toarray().ravel()) for X in (a, b)
    )
    flat = (low_a == high_a) & (low_b == high_b)
    limit = np.where(high_a == high_b, 0.0, np.copysign(np.inf, high_a - high_b))
    se = np.sqrt(var_a / a.shape[0] + var_b / b.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flat, limit, (mean_a - mean_b) / se)


def _mean_var(X: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Column means and unbiased variances of `X` (canonical CSR), in two passes, without densifying it."""
    n = X.shape[0]
    mean = _mean(X)
    nonzero = np.bincount(X.indices, minlength=X.shape[1])
    squares = np.bincount(X.indices, weights=(X.data - mean[X.indices]) ** 2, minlength=X.shape[1])
    return mean, (squares + (n - nonzero) * mean**2) / max(n - 1, 1)


def _r2(x: pd.Series, y: pd.Series) -> float:
    """Squared Pearson correlation of `x` and `y`; ``nan`` where either is constant or undefined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan
    return float(np.corrcoef(x, y)[0, 1] ** 2)
