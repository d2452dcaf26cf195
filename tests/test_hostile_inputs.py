"""Hostile inputs for every public verb and for the sc-c2s command, drawn by hypothesis.

For every drawn input a verb either returns a result that passes its own invariants, or raises an exception of a
documented type whose message names the argument (or the part of the data) at fault. Either way the AnnData or
MuData it was given is unchanged: X, layers, raw, obs, var, obsm and uns, besides the results a successful
in-place call adds. The command answers a user mistake with one line on stderr and a user-error status.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch
from anndata.abc import CSCDataset, CSRDataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import sparse

import sc_c2s
from sc_c2s import cli
from sc_c2s._utils._validate import SEED_LIMIT
from sc_c2s.models import C2SMetadata, C2SModel, _registry
from sc_c2s.models._scratch import build_model, build_tokenizer
from sc_c2s.tl._score_generation import COLUMNS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Settings of every property here: few examples each, so that the module runs in well under a minute, drawn the
#: same way on every run, so that the suite passes or fails on the code alone. ``SC_C2S_HOSTILE_SCALE=20``
#: multiplies the examples and draws them at random, for a deeper search now and then.
SCALE = int(os.environ.get("SC_C2S_HOSTILE_SCALE", "1"))
HOSTILE = settings(
    deadline=None,
    derandomize=SCALE == 1,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
GENES = [f"G{i}" for i in range(10)]
LABELS = ["alpha", "beta", "gamma cell"]
#: Results `to_sentences` adds.
SENTENCE_KEYS = {("obs", "c2s_sentence"), ("obsm", "c2s_genes"), ("uns", "c2s")}
FAILED = object()


# --- what a call may do, and checking it ----------------------------------------------------------------------------


@dataclass
class Expect:
    """What a drawn input may make a verb do: the names an error may give, and whether one is sure."""

    names: set[str] = field(default_factory=set)
    """An error's message must contain one of these."""
    fails: bool = False
    """Whether some argument is surely wrong."""

    def bad(self, *names: str, surely: bool = True) -> None:
        self.names.update(names)
        self.fails |= surely


def outcome(call: Callable[[], Any], expect: Expect, errors: tuple[type[Exception], ...]) -> Any:
    """Run `call`; return its result, or :data:`FAILED` after checking the error it raised against `expect`.

    Documented warnings (UserWarning) are allowed; any other warning is an error under the test settings.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            result = call()
        except errors as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            event(f"raised {type(e).__name__}: {message[:50]}")
            assert "\n" not in message.strip() or "Traceback" not in message
            assert any(name in message for name in expect.names), f"{type(e).__name__}: {message} / {expect.names}"
            return FAILED
    assert not expect.fails, f"no error, but expected one naming one of {expect.names}"
    event("returned")
    return result


def pick(draw: Callable, good: list, bad: list = (), *, clean: bool) -> tuple[Any, bool]:
    """Draw one of `good`, or of `good` and `bad` unless the example is `clean`; say whether it is a bad one.

    Half the examples are clean, so that results, not only errors, are checked.
    """
    options = [*good] if clean else [*good, *bad]
    i = draw(st.integers(0, len(options) - 1))
    return options[i], i >= len(good)


def in_memory(X: Any) -> Any:
    if isinstance(X, CSRDataset | CSCDataset):
        return X.to_memory()
    if hasattr(X, "id") and hasattr(X, "__getitem__") and not isinstance(X, np.ndarray):  # h5py dataset
        return X[()]
    return X


def assert_matrix_equal(a: Any, b: Any) -> None:
    a, b = in_memory(a), in_memory(b)
    if a is None or b is None:
        assert a is None and b is None
        return
    assert sparse.issparse(a) == sparse.issparse(b)
    assert (a.shape, a.dtype) == (b.shape, b.dtype)
    if sparse.issparse(a):
        assert a.format == b.format
        for name in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    else:
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def assert_same(a: Any, b: Any) -> None:
    """Deep equality of uns values, obsm entries and the like."""
    if isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    elif sparse.issparse(a) or isinstance(a, np.ndarray):
        assert_matrix_equal(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert type(a) is type(b) and a == b


def assert_unchanged(data: Any, before: Any, *, added: set[tuple[str, str]] = frozenset()) -> None:
    """`data` equals its copy `before`, besides the entries `added` (attribute, key) a call may write."""
    pairs = [(data.mod[m], before.mod[m]) for m in before.mod] if isinstance(before, md.MuData) else [(data, before)]
    for a, b in pairs:
        assert_matrix_equal(a.X, b.X)
        assert set(a.layers) == set(b.layers)
        for key in b.layers:
            assert_matrix_equal(a.layers[key], b.layers[key])
        pd.testing.assert_frame_equal(a.var, b.var)
        assert (a.raw is None) == (b.raw is None)
        if b.raw is not None:
            assert_matrix_equal(a.raw.X, b.raw.X)
            pd.testing.assert_frame_equal(a.raw.var, b.raw.var)
        new_obs = {key for attr, key in added if attr == "obs"}
        pd.testing.assert_frame_equal(a.obs.drop(columns=[c for c in a.obs.columns if c in new_obs]), b.obs)
        for attr in ("obsm", "uns"):
            new = {key for kind, key in added if kind == attr}
            mine, theirs = getattr(a, attr), getattr(b, attr)
            assert set(mine) - new == set(theirs) - new
            for key in set(theirs) - new:
                assert_same(mine[key], theirs[key])
    if isinstance(before, md.MuData):
        mirrored = {f"{m}:{key}" for m in before.mod for attr, key in added if attr == "obs"}
        pd.testing.assert_frame_equal(data.obs.drop(columns=[c for c in data.obs.columns if c in mirrored]), before.obs)


def snapshot(data: Any) -> Any:
    """An in-memory copy of the data as the verb sees it."""
    if isinstance(data, ad.AnnData) and data.isbacked:
        return quietly(data.to_memory)
    return quietly(data.copy)


def rna(data: Any) -> ad.AnnData:
    return data.mod["rna"] if isinstance(data, md.MuData) else data


def quietly(make: Callable[[], Any]) -> Any:
    """Build test data without anndata's and mudata's own warnings (e.g. about the duplicated names under test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


# --- pp.to_sentences ------------------------------------------------------------------------------------------------

#: Values of `random_state`, made anew for each call (generators have a state).
SEEDS: dict[str, Callable[[], Any]] = {
    "0": lambda: 0,
    "7": lambda: np.int64(7),
    "largest": lambda: SEED_LIMIT - 1,
    "None": lambda: None,
    "Generator": lambda: np.random.default_rng(1),
    "RandomState": lambda: np.random.RandomState(1),
    "-1": lambda: -1,
    "2**63": lambda: SEED_LIMIT,
    "2**70": lambda: 2**70,
    "0.5": lambda: 0.5,
    "'0'": lambda: "0",
    "True": lambda: True,
}
BAD_SEEDS = {"-1", "2**63", "2**70", "0.5", "'0'", "True"}
FLOATS = (np.float32, np.float64, np.float16)
DTYPES = (*FLOATS, np.int64, np.int32, np.uint8, np.bool_, np.complex64, object)
SPECIAL = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "negative": -1.0, "huge": 1e30, "tiny": 1e-30}


def as_format(values: np.ndarray, fmt: str, dtype: Any) -> Any:
    """Store `values` as `fmt`; the sparse formats that store duplicates split each entry in two."""
    X = values.astype(dtype)
    if fmt == "dense":
        return X
    if fmt == "fortran":
        return np.asfortranarray(X)
    if fmt in ("csr", "csc"):
        return sparse.csr_matrix(X) if fmt == "csr" else sparse.csc_matrix(X)
    coo = sparse.coo_matrix(X)
    if fmt == "csr-duplicates":  # each entry twice, its value split in halves (integers: value and zero)
        halves = np.where(np.isfinite(coo.data), coo.data / 2, 0) if X.dtype.kind in "fc" else coo.data * 0
        first = coo.data - halves
        rows, cols = np.concatenate([coo.row, coo.row]), np.concatenate([coo.col, coo.col])
        order = np.lexsort((np.arange(len(rows)), rows))
        counts = np.bincount(rows, minlength=X.shape[0])
        indptr = np.concatenate([[0], np.cumsum(counts)])
        data = np.concatenate([first, halves]).astype(X.dtype)[order]
        return sparse.csr_matrix((data, cols[order], indptr), shape=X.shape)
    csr = sparse.csr_matrix(X)  # "csr-unsorted": each row's entries reversed
    for i in range(X.shape[0]):
        s, e = csr.indptr[i], csr.indptr[i + 1]
        csr.indices[s:e], csr.data[s:e] = csr.indices[s:e][::-1].copy(), csr.data[s:e][::-1].copy()
    csr.has_sorted_indices = False
    return csr


@st.composite
def gene_names(draw, n: int, expect: Expect, where: str, *, clean: bool) -> list[str]:
    names = [f"G{i}" for i in range(n)]
    if n < 2:
        return names
    trouble, bad = pick(draw, [None, None, "case", "unicode"], ["duplicate", "empty", "space"], clean=clean)
    if bad:
        names[1] = {"duplicate": names[0], "empty": "", "space": "G 1"}[trouble]
        expect.bad(where, "gene_symbols")
    elif trouble == "case":
        names[1] = names[0].lower()  # a warning, not an error
    elif trouble == "unicode":
        names[1] = "Gène-1.β"
    return names


@st.composite
def expression_cases(draw) -> tuple[Any, dict[str, Any], Expect, np.ndarray, list[str]]:
    """Data with hostile expression, storage, names and arguments; the expected errors, the dense expression
    (duplicates summed) and the words of the matrix that should be ranked."""
    expect = Expect()
    clean = draw(st.booleans())
    n_obs, n_vars = draw(st.integers(int(clean), 5)), draw(st.integers(int(clean), 6))
    dtype, _ = pick(draw, list(DTYPES[:-2]), list(DTYPES[-2:]), clean=clean)
    dense_only = dtype in (np.float16, object)
    fmt = draw(
        st.sampled_from(
            ["dense", "fortran"] if dense_only else ["dense", "fortran", "csr", "csc", "csr-duplicates", "csr-unsorted"]
        )
    )
    values = draw(hnp.arrays(np.int64, (n_obs, n_vars), elements=st.sampled_from([0, 0, 0, 1, 1, 2, 3, 9])))
    values = values.astype(np.float64)
    where, _ = pick(draw, ["X", "layer", "raw"], ["x-none"], clean=clean)
    source = {"X": "`X`", "layer": "layers['counts']", "raw": "raw.X", "x-none": "`X`"}[where]
    kind = np.dtype(dtype).kind
    good = [None, None, *(["tiny"] if kind == "f" else []), *(["huge"] if kind == "f" and dtype != np.float16 else [])]
    bad = ["nan", "inf", "-inf", "negative"] if kind == "f" else ["negative"] if kind == "i" else []
    special = pick(draw, good, bad, clean=clean)[0] if values.size else None
    if special is not None:
        cell, gene = draw(st.integers(0, n_obs - 1)), draw(st.integers(0, n_vars - 1))
        values[cell, gene] = SPECIAL[special]
        if special in ("nan", "inf", "-inf", "negative"):
            expect.bad(source)
    if dtype == np.bool_:
        values = values > 0
    if np.dtype(dtype).kind not in "biuf":
        expect.bad(source)
    elif 0 in values.shape:
        expect.bad(source)
    if where == "x-none":
        expect.bad("layer")

    # var_names are the words only without `gene_symbols`: their trouble counts once that is decided
    names_expect = Expect()
    names = draw(gene_names(n_vars, names_expect, "var_names", clean=clean))
    dense = values.astype(dtype).astype(np.float64) if np.dtype(dtype).kind in "biuf" else None  # as stored

    var = pd.DataFrame(index=pd.Index(names, dtype=str))
    kwargs: dict[str, Any] = {}
    symbols, _ = pick(draw, [None, "sym"], ["missing"], clean=clean)
    if symbols == "sym":
        var["sym"] = draw(gene_names(n_vars, expect, "var['sym']", clean=clean))
        kwargs["gene_symbols"] = "sym"
    elif symbols == "missing":
        kwargs["gene_symbols"] = "missing"
        expect.bad("gene_symbols")
    else:
        expect.bad(*names_expect.names, surely=names_expect.fails)
    words = list(var["sym"]) if symbols == "sym" else names

    container = draw(st.sampled_from(["anndata", "mudata", "view", "backed"]))
    if container == "backed" and (where != "X" or fmt not in ("dense", "csr", "csr-duplicates") or dense_only):
        container = "anndata"
    # a view shows all cells but one extra, whose row is of zeros
    extra = int(container == "view")
    rows = np.vstack([values, np.zeros((extra, n_vars), dtype=values.dtype)])
    matrix = as_format(rows, fmt, dtype)

    def build() -> ad.AnnData:
        other = np.zeros(rows.shape, dtype=np.float32)
        obs = pd.DataFrame({"group": "a"}, index=[f"c{i}" for i in range(rows.shape[0])])
        if where == "X":
            return ad.AnnData(matrix, obs=obs, var=var)
        if where == "layer":
            return ad.AnnData(other, obs=obs, var=var, layers={"counts": matrix})
        if where == "raw":
            adata = ad.AnnData(other, obs=obs, var=var)
            adata.raw = ad.AnnData(matrix, obs=obs, var=var)
            return adata
        adata = ad.AnnData(None, obs=obs, var=var)
        adata.layers["counts"] = matrix
        return adata

    kwargs["use_raw"] = draw(st.sampled_from([None, True] if where == "raw" else [None, False]))
    if where == "layer":
        kwargs["layer"] = "counts"

    misuse, _ = pick(
        draw, [None], ["missing-layer", "raw-without-raw", "layer-and-raw", "use_raw-as-text"], clean=clean
    )
    if misuse == "missing-layer":
        kwargs["layer"] = "missing"
        kwargs.pop("use_raw", None)
        expect.bad("layer")
    elif misuse == "raw-without-raw" and where != "raw":
        kwargs = {**kwargs, "use_raw": True}
        kwargs.pop("layer", None)
        expect.bad("use_raw")
    elif misuse == "layer-and-raw":
        kwargs = {**kwargs, "layer": "counts", "use_raw": True}
        expect.bad("layer", "use_raw")
    elif misuse == "use_raw-as-text":  # truthy: it would read `.raw`
        kwargs["use_raw"] = "False"
        expect.bad("use_raw")

    kwargs["n_genes"], bad = pick(draw, [None, 1, 2, 10**9], [0, -1, 1.5, "3", True], clean=clean)
    if bad:
        expect.bad("n_genes")
    seed, bad = pick(draw, [k for k in SEEDS if k not in BAD_SEEDS], sorted(BAD_SEEDS), clean=clean)
    kwargs["random_state"] = seed  # made in the test: strategies draw no random numbers
    if bad:
        expect.bad("random_state")
    rank_fit, bad = pick(draw, [True, False, 1, 3], [0, -1, 1.5, "all"], clean=clean)
    if bad:
        expect.bad("rank_fit")
    elif rank_fit is not False:
        expect.bad("rank_fit", surely=False)  # too few expressed genes to fit a line: the data decides
    kwargs["rank_fit"] = rank_fit
    kwargs["sentences"] = draw(st.booleans())
    kwargs["copy"] = draw(st.booleans())

    if container == "mudata" and draw(st.booleans()):
        kwargs["mod"], bad = pick(draw, ["rna"], ["protein"], clean=clean)
        if bad:
            expect.bad("mod")

    def make(directory: Path) -> Any:
        """The data in its container; the backed file goes into `directory`."""
        adata = quietly(build)
        if container == "mudata":
            return quietly(lambda: md.MuData({"rna": adata}))
        if container == "view":
            return adata[:n_obs]
        if container == "backed":
            quietly(lambda: adata.write_h5ad(directory / "x.h5ad"))
            return quietly(lambda: ad.read_h5ad(directory / "x.h5ad", backed="r"))
        return adata

    return make, kwargs, expect, dense, words


def check_ranking(adata: ad.AnnData, dense: np.ndarray, words: list[str], kwargs: dict[str, Any]) -> None:
    """The invariants of `to_sentences`: the expressed genes of each cell, best first, and their words."""
    genes = adata.obsm["c2s_genes"]
    n_genes = kwargs["n_genes"]
    assert genes.dtype == np.int32
    assert genes.shape[0] == adata.n_obs == dense.shape[0]
    assert genes.shape[1] <= dense.shape[1]
    assert n_genes is None or genes.shape[1] <= n_genes
    for i, row in enumerate(genes):
        listed = row[row >= 0]
        assert (row[len(listed) :] == -1).all()
        assert len(set(listed.tolist())) == len(listed)
        values = dense[i, listed]
        n_expressed = int((dense[i] > 0).sum())
        assert len(listed) == min(n_expressed, n_genes or n_expressed)
        assert (values > 0).all()
        assert (np.diff(values) <= 0).all()
        if len(listed):
            assert (np.delete(dense[i], listed) <= values[-1]).all()
        if kwargs["sentences"]:
            assert adata.obs["c2s_sentence"].iloc[i] == " ".join(np.asarray(words, dtype=object)[listed])
    c2s = adata.uns["c2s"]
    assert list(c2s["genes"]) == list(words)
    assert 0 <= c2s["params"]["random_state"] < SEED_LIMIT
    if kwargs["rank_fit"] is not False:
        fit = c2s["rank_fit"]
        assert np.isfinite([fit["slope"], fit["intercept"], fit["r2"]]).all()


@settings(HOSTILE, max_examples=120 * SCALE)
@given(case=expression_cases())
def test_to_sentences(case):
    make, kwargs, expect, dense, words = case
    kwargs = {**kwargs, "random_state": SEEDS[kwargs["random_state"]]()}
    directory = Path(tempfile.mkdtemp(prefix="sc_c2s-hostile-"))
    data = make(directory)
    try:
        parent = data._adata_ref if isinstance(data, ad.AnnData) and data.is_view else None
        parent_before = None if parent is None else snapshot(parent)
        before = snapshot(data)
        result = outcome(lambda: sc_c2s.pp.to_sentences(data, **kwargs), expect, (ValueError, KeyError, TypeError))
        if result is FAILED:
            assert_unchanged(data, before)
        elif kwargs["copy"]:
            assert_unchanged(data, before)
            check_ranking(rna(result), dense, words, kwargs)
        else:
            assert result is None
            assert_unchanged(data, before, added=SENTENCE_KEYS)
            check_ranking(rna(data), dense, words, kwargs)
        if parent is not None:
            assert_unchanged(parent, parent_before)
    finally:
        if isinstance(data, ad.AnnData) and data.isbacked:
            data.file.close()
        shutil.rmtree(directory)


# --- tl.from_sentences ----------------------------------------------------------------------------------------------

WORDS = st.sampled_from(["G1", "g2", "G3.", "(G4)", "G1", "NOTAGENE", "", "—", "Gène-1.β", "G9,", "1e5", "nan"])
SENTENCES = st.one_of(
    st.lists(st.text(alphabet=" \t\n.,", max_size=3).map(str) | st.lists(WORDS, max_size=6).map(" ".join), max_size=4),
    st.lists(st.sampled_from([None, np.nan, 7, "G1 G2"]), max_size=3),
    st.sampled_from([None, "G1 G2", 5]),
)


@settings(HOSTILE, max_examples=60 * SCALE)
@given(
    sentences=SENTENCES,
    genes=st.sampled_from([GENES, ["G1", "g1", "G2"], ["G1", "G1"], [], [1, 2, 3], None, "G1", np.array(GENES)]),
    fit=st.sampled_from(
        [
            {"slope": -0.7, "intercept": 2.0},
            {"slope": -0.7, "intercept": 2.0, "r2": float("nan"), "unknown": 1},
            {"slope": float("nan"), "intercept": 2.0},
            {"slope": -0.7, "intercept": float("inf")},
            {"slope": "-0.7", "intercept": 2.0},
            {"slope": -0.7},
            None,
            [1, 2],
        ]
    ),
)
def test_from_sentences(sentences, genes, fit):
    expect = Expect()
    if not isinstance(fit, dict) or "intercept" not in fit:
        expect.bad("rank fit")
    elif not all(isinstance(fit[k], float) and math.isfinite(fit[k]) for k in ("slope", "intercept")):
        expect.bad("rank_fit[")
    if genes is None or isinstance(genes, str):
        expect.bad("`genes`")
    elif len(set(map(str, genes))) < len(genes):
        expect.bad("`genes`")
    if sentences is None or isinstance(sentences, str | int):
        expect.bad("`sentences`")
    cells = outcome(
        lambda: sc_c2s.tl.from_sentences(sentences, genes=genes, rank_fit=fit), expect, (ValueError, TypeError)
    )
    if cells is FAILED:
        return
    assert cells.shape == (len(sentences), len(genes))
    assert cells.X.dtype == np.float32
    assert np.isfinite(cells.X.data).all() and (cells.X.data > 0).all()
    counts = cells.obs[["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]].to_numpy()
    assert (counts >= 0).all()
    np.testing.assert_array_equal(cells.X.getnnz(axis=1), counts[:, 0])


# --- the models and the verbs that run them -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranked() -> ad.AnnData:
    """Eight cells of the three labels over the ten genes, ranked, with a rank fit."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        rng.poisson(2, (8, len(GENES))).astype(np.float32),
        obs=pd.DataFrame({"label": [LABELS[i % 3] for i in range(8)]}, index=[f"c{i}" for i in range(8)]),
        var=pd.DataFrame(index=GENES),
    )
    adata.X[3] = 0  # a cell with an empty sentence
    sc_c2s.pp.to_sentences(adata)
    return adata


@pytest.fixture(scope="module")
def tiny(ranked) -> C2SModel:
    tokenizer = build_tokenizer(GENES, LABELS, max_genes=12)
    model = build_model(tokenizer, hidden_size=16, n_layers=1, n_heads=2, max_length=96).eval()
    metadata = C2SMetadata(
        name="tiny-hostile", labels=LABELS, vocabulary=GENES, rank_fit=ranked.uns["c2s"]["rank_fit"], n_genes=5
    )
    return C2SModel(model, tokenizer, metadata, Path("tiny-hostile"))


def data_with_sentences(draw: Callable, ranked: ad.AnnData, expect: Expect, *, clean: bool) -> Any:
    """The ranked cells, or a broken version of them, in some container (built outside any strategy)."""
    trouble, _ = pick(draw, [None, "expressed", "one-cell"], ["no-sentences", "no-rank-fit", "all-empty"], clean=clean)
    container = draw(st.sampled_from(["anndata", "mudata", "view"]))
    adata = ranked.copy()
    if trouble == "no-sentences":
        del adata.uns["c2s"], adata.obsm["c2s_genes"]
        expect.bad("to_sentences")
    elif trouble == "no-rank-fit":
        del adata.uns["c2s"]["rank_fit"]
    elif trouble == "all-empty":
        adata.obsm["c2s_genes"][:] = -1
        adata.obs["c2s_sentence"] = ""
        expect.bad("empty sentences", surely=False)
    elif trouble == "one-cell":
        adata = adata[:1].copy()
    elif trouble == "expressed":  # leave out the cell with an empty sentence
        adata = adata[(adata.obsm["c2s_genes"] >= 0).any(axis=1)].copy()
    if container == "mudata":
        return quietly(lambda: md.MuData({"rna": adata}))
    if container == "view":
        return adata[adata.obs_names[: max(1, adata.n_obs - 1)]]
    return adata


def argument(draw: Callable, kwargs: dict, expect: Expect, name: str, good: list, bad: list, *, clean: bool) -> Any:
    """Draw the value of argument `name` into `kwargs`; a bad one is expected to be named in the error."""
    kwargs[name], is_bad = pick(draw, good, bad, clean=clean)
    if is_bad:
        expect.bad(name)
    return kwargs[name]


def model_arguments(draw: Callable, expect: Expect, *, tiny: C2SModel, clean: bool, organism: bool = True) -> dict:
    """`model`, `device`, `batch_size`, `n_genes` (and `organism`), some of them hostile."""
    kwargs: dict[str, Any] = {"model": tiny}
    argument(draw, kwargs, expect, "device", [None, "cpu"], ["cuda", "cuda:3", "gpu", 1.5], clean=clean)
    argument(draw, kwargs, expect, "batch_size", [None, 1, 3], [0, -2, 2.5], clean=clean)
    argument(draw, kwargs, expect, "n_genes", [1, 3, 5], [0, -1, "5"], clean=clean)
    if organism:
        argument(draw, kwargs, expect, "organism", [None, "Mus musculus"], ["human"], clean=clean)
    return kwargs


@settings(HOSTILE, max_examples=30 * SCALE)
@given(data=st.data())
def test_annotate(ranked, tiny, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect, clean = Expect(), data.draw(st.booleans())
    adata = data_with_sentences(data.draw, ranked, expect, clean=clean)
    kwargs = model_arguments(data.draw, expect, tiny=tiny, clean=clean)
    good = [None, "model", LABELS, ["alpha"], ["alpha", "delta"]]
    labels = argument(
        data.draw, kwargs, expect, "labels", good, [["alpha", "alpha"], [], ["alpha", ""], "alpha"], clean=clean
    )
    key_added = argument(data.draw, kwargs, expect, "key_added", ["c2s_cell_type", "mine"], ["", 3], clean=clean)
    copy = data.draw(st.booleans())
    before = snapshot(adata)
    result = outcome(lambda: sc_c2s.tl.annotate(adata, copy=copy, **kwargs), expect, (ValueError, KeyError, TypeError))
    if result is FAILED or copy:
        assert_unchanged(adata, before)
    else:
        assert_unchanged(adata, before, added={("obs", key_added), ("obs", f"{key_added}_score"), ("uns", key_added)})
    if result is FAILED:
        return
    cells = rna(result if copy else adata)
    types = cells.obs[key_added]
    scores = cells.obs[f"{key_added}_score"].to_numpy()
    assert isinstance(types.dtype, pd.CategoricalDtype)
    if labels is None:  # free answers that list genes are missing, score and all
        np.testing.assert_array_equal(types.isna(), np.isnan(scores))
    else:
        assert types.notna().all()
        assert set(types) <= set(LABELS if labels == "model" else labels)
    scores = scores[~np.isnan(scores)]
    assert ((scores >= 0) & (scores <= 1 + 1e-6)).all()
    assert cells.uns[key_added]["params"]["model"] == "tiny-hostile"


@settings(HOSTILE, max_examples=20 * SCALE)
@given(data=st.data())
def test_embed(ranked, tiny, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect, clean = Expect(), data.draw(st.booleans())
    adata = data_with_sentences(data.draw, ranked, expect, clean=clean)
    kwargs = model_arguments(data.draw, expect, tiny=tiny, clean=clean, organism=False)
    argument(data.draw, kwargs, expect, "key_added", ["X_c2s"], [""], clean=clean)
    genes = rna(adata).obsm.get("c2s_genes")
    expect.bad("empty sentences", surely=genes is not None and (genes < 0).all(axis=1).any())
    before = snapshot(adata)
    result = outcome(lambda: sc_c2s.tl.embed(adata, copy=True, **kwargs), expect, (ValueError, KeyError, TypeError))
    assert_unchanged(adata, before)
    if result is not FAILED:
        embedding = rna(result).obsm["X_c2s"]
        assert embedding.shape == (rna(adata).n_obs, 16)
        assert embedding.dtype == np.float32
        assert np.isfinite(embedding).all()


#: Values of `cell_types`: good ones, then bad ones (10**12 cells cannot fit in memory).
GOOD_CELL_TYPES = [["alpha"], ["alpha", "beta", "alpha"], {"gamma cell": 2, "beta": 0}, ("beta",)]
BAD_CELL_TYPES = [
    {"alpha": 10**12},
    [],
    {"alpha": 0},
    "alpha",
    [""],
    ["alpha\nbeta"],
    {"alpha": -1},
    {"alpha": True},
    {"alpha": 1.0},
    3,
    None,
]


@settings(HOSTILE, max_examples=30 * SCALE)
@given(data=st.data())
def test_generate(ranked, tiny, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect, clean = Expect(), data.draw(st.booleans())
    adata = None
    if data.draw(st.booleans()):
        adata = data_with_sentences(data.draw, ranked, expect, clean=clean)
        if "c2s" in rna(adata).uns and "rank_fit" not in rna(adata).uns["c2s"]:
            expect.bad("rank_fit")
    kwargs = model_arguments(data.draw, expect, tiny=tiny, clean=clean)
    cell_types = argument(data.draw, kwargs, expect, "cell_types", GOOD_CELL_TYPES, BAD_CELL_TYPES, clean=clean)
    if data.draw(st.booleans()) and not clean:
        kwargs["cell_types"] = cell_types = ["delta"]
        expect.bad("does not know the cell types")
    nan, inf = float("nan"), float("inf")
    argument(data.draw, kwargs, expect, "temperature", [None, 1.0, 0.5, 2], [0, -1.0, nan, inf, "1"], clean=clean)
    argument(data.draw, kwargs, expect, "top_k", [None, 1, 50], [0, -3, 2.5], clean=clean)
    argument(data.draw, kwargs, expect, "top_p", [None, 0.5, 1], [0, 1.5, nan], clean=clean)
    seed = argument(
        data.draw, kwargs, expect, "random_state", ["0", "None", "Generator"], ["-1", "2**63", "'0'"], clean=clean
    )
    kwargs["random_state"] = SEEDS[seed]()
    argument(data.draw, kwargs, expect, "unique_genes", [True, False, np.False_], ["False", 0], clean=clean)
    argument(data.draw, kwargs, expect, "exact_length", [True, False], ["True", None], clean=clean)
    before = None if adata is None else snapshot(adata)
    result = outcome(lambda: sc_c2s.tl.generate(adata, **kwargs), expect, (ValueError, KeyError, TypeError))
    if before is not None:
        assert_unchanged(adata, before)
    if result is FAILED:
        return
    requested = (
        [t for t, n in cell_types.items() for _ in range(n)] if isinstance(cell_types, dict) else list(cell_types)
    )
    assert result.obs["cell_type"].astype(str).tolist() == requested
    assert result.X.format == "csr" and result.X.dtype == np.float32
    assert np.isfinite(result.X.data).all() and (result.X.data >= 0).all()
    assert result.var_names.tolist() == (GENES if adata is None else rna(adata).var_names.tolist())
    np.testing.assert_array_equal(result.X.getnnz(axis=1), result.obs["n_valid_genes"])
    assert 0 <= result.uns["c2s_generate"]["params"]["random_state"] < SEED_LIMIT


@settings(HOSTILE, max_examples=25 * SCALE)
@given(data=st.data())
def test_score_generation(ranked, data):
    expect, clean = Expect(), data.draw(st.booleans())
    real = ranked.copy()
    real.obs["label"] = ["alpha"] * 5 + ["beta"] * 3
    generated = ad.AnnData(
        obs=pd.DataFrame(
            {"cell_type": real.obs["label"].to_numpy(), "c2s_sentence": real.obs["c2s_sentence"].to_numpy()},
            index=[f"generated-{i}" for i in range(real.n_obs)],
        )
    )
    bad = ["unknown-words", "no-words", "unknown-types", "no-sentence-column"]
    trouble, _ = pick(data.draw, [None, "nan-sentences"], bad, clean=clean)
    if trouble == "unknown-words":
        generated.obs["c2s_sentence"] = "NOTAGENE OTHER"
        expect.bad("is a gene of the real cells")
    elif trouble == "no-words":
        generated.obs["c2s_sentence"] = ""
        expect.bad("hold no words")
    elif trouble == "nan-sentences":
        generated.obs.loc[generated.obs_names[:2], "c2s_sentence"] = np.nan
    elif trouble == "unknown-types":
        generated.obs["cell_type"] = "delta"
        expect.bad("No generated cell type")
    elif trouble == "no-sentence-column":
        del generated.obs["c2s_sentence"]
        expect.bad("c2s_sentence")
    kwargs: dict[str, Any] = {}
    argument(data.draw, kwargs, expect, "label_key", ["label"], ["missing"], clean=clean)
    argument(data.draw, kwargs, expect, "n_genes", [None, 2], [0], clean=clean)
    argument(data.draw, kwargs, expect, "n_comps", [50, 1], [0], clean=clean)
    argument(data.draw, kwargs, expect, "n_neighbors", [10, 1], [-1], clean=clean)
    argument(data.draw, kwargs, expect, "max_cells", [1000, 2], [0, 1.5], clean=clean)
    argument(data.draw, kwargs, expect, "random_state", [0, None, 2**32 - 1], [-1, 2**32], clean=clean)
    before_real, before_generated = real.copy(), generated.copy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Left out generated cell types", UserWarning)  # 'beta' has 3 real cells
        scores = outcome(
            lambda: sc_c2s.tl.score_generation(real, generated, **kwargs), expect, (ValueError, KeyError, TypeError)
        )
    assert_unchanged(real, before_real)
    assert_unchanged(generated, before_generated)
    if scores is FAILED:
        return
    assert scores.columns.tolist() == COLUMNS
    assert scores.index.tolist() == ["alpha", "overall"]
    assert scores.loc["alpha", "n_real"] == min(3, kwargs["max_cells"]) + min(2, kwargs["max_cells"])  # two halves


@settings(HOSTILE, max_examples=12 * SCALE)
@given(data=st.data())
def test_finetune_refuses_bad_arguments(ranked, data, tmp_path_factory, monkeypatch):
    """Each drawn argument is wrong (a successful run trains a model, which takes seconds): the error names it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect = Expect()
    name, value = data.draw(
        st.sampled_from(
            [
                ("label_key", "missing"),
                ("tasks", ("translation",)),
                ("n_genes", 0),
                ("epochs", 0),
                ("batch_size", -1),
                ("learning_rate", float("nan")),
                ("gene_dropout", 1.0),
                ("eval_fraction", -0.1),
                ("random_state", -1),
                ("organism", "human"),
                ("device", "cuda"),
                ("paraphrase", "no"),
                ("gradient_checkpointing", 1),
            ]
        )
    )
    expect.bad(name)
    expect.bad("obs['label']", surely=False)  # the drawn cells may have a single label
    adata = data_with_sentences(data.draw, ranked, expect, clean=data.draw(st.booleans()))
    output_dir = tmp_path_factory.mktemp("finetune") / "model"
    kwargs = {"label_key": "label", "base_model": "scratch", "output_dir": output_dir, "epochs": 1, name: value}
    before = snapshot(adata)
    result = outcome(lambda: sc_c2s.tl.finetune(adata, **kwargs), expect, (ValueError, KeyError, TypeError))
    assert result is FAILED
    assert_unchanged(adata, before)
    assert not output_dir.exists()


def test_flags_take_true_or_false_only(ranked, tiny, tmp_path):
    """Each flag refuses what is not a bool, and the data stays untouched.

    A string is truthy: `unique_genes="False"` kept genes unique. The draws above meet such values too rarely to be
    sure of each flag.
    """
    adata = ranked.copy()
    before = snapshot(adata)
    output_dir = tmp_path / "model"
    train = {"label_key": "label", "base_model": "scratch", "output_dir": output_dir, "epochs": 1}
    generate = {"model": tiny, "cell_types": ["alpha"]}
    perturbation = {"model": tiny, "perturbations": ["x"], "condition_key": "label", "control": "alpha"}
    groups = {"model": tiny, "groupby": "label"}
    calls = [
        ("use_raw", lambda: sc_c2s.pp.to_sentences(adata, use_raw="False")),
        ("unique_genes", lambda: sc_c2s.tl.generate(adata, **generate, unique_genes="False")),
        ("exact_length", lambda: sc_c2s.tl.predict_perturbation(adata, **perturbation, exact_length=0)),
        ("paraphrase", lambda: sc_c2s.tl.finetune(adata, **train, paraphrase="no")),
        ("gradient_checkpointing", lambda: sc_c2s.tl.finetune(adata, **train, gradient_checkpointing=1)),
        ("merge", lambda: sc_c2s.models.load("demo", merge="False")),
        # a truthy copy="False" returned a copy and wrote nothing into `adata`
        ("copy", lambda: sc_c2s.pp.to_sentences(adata, copy="False")),
        ("copy", lambda: sc_c2s.tl.annotate(adata, model=tiny, copy="False")),
        ("copy", lambda: sc_c2s.tl.embed(adata, model=tiny, copy=1)),
        ("copy", lambda: sc_c2s.tl.predict_tissue(adata, **groups, copy="False")),
        ("copy", lambda: sc_c2s.tl.summarize(adata, **groups, copy="False")),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"^`{name}` must be True(, False or None| or False), got "):
            call()
    assert_unchanged(adata, before)
    assert not output_dir.exists()


def test_one_name_arguments_refuse_lists(ranked, tiny):
    """A list where one name is expected failed with `TypeError: unhashable type: 'list'` (`pair_by` takes a list)."""
    adata = ranked.copy()
    before = snapshot(adata)
    mudata = quietly(lambda: md.MuData({"rna": adata}))
    calls = [
        ("groupby", "column of obs", lambda: sc_c2s.tl.predict_tissue(adata, model=tiny, groupby=["label"])),
        (
            "label_key",
            "column of the real cells' obs",
            lambda: sc_c2s.tl.score_generation(adata, adata, label_key=["label"]),
        ),
        (
            "generated_key",
            "column of the generated cells' obs",
            lambda: sc_c2s.tl.score_generation(adata, adata, label_key="label", generated_key=["label"]),
        ),
        ("layer", "layer", lambda: sc_c2s.pp.to_sentences(adata, layer=["counts"])),
        ("gene_symbols", "column of var", lambda: sc_c2s.pp.to_sentences(adata, gene_symbols=["symbol"])),
        ("mod", "modality", lambda: sc_c2s.tl.annotate(mudata, model=tiny, mod=["rna"])),
    ]
    for name, what, call in calls:
        with pytest.raises(TypeError, match=rf"^`{name}` must be the name of one {what}, got \["):
            call()
    assert_unchanged(adata, before)


def test_things_that_are_not_what_a_verb_reads(ranked):
    """A matrix for the generated cells, strings for cells and a DataFrame for the gene indices met attribute and
    key errors of other packages; `upper="False"` upper-cased."""
    adata = ranked.copy()
    with pytest.raises(TypeError, match=r"^`generated` must be the AnnData returned by `sc_c2s.tl.generate`, got csr"):
        sc_c2s.tl.score_generation(adata, sparse.csr_matrix((2, 2)), label_key="label")
    with pytest.raises(TypeError, match=r"^`predicted` must be the AnnData returned by .* got DataFrame"):
        sc_c2s.tl.score_perturbation(adata, adata.obs, condition_key="label", control="alpha", groupby="label")
    with pytest.raises(TypeError, match=r"^`cells` must be a list of cells, each a list of gene names, got strings"):
        sc_c2s.prompts.tissue_prediction(["CD3E CD4", "MS4A1"], n_genes=2)
    with pytest.raises(ValueError, match=r"^`upper` must be True or False, got 'False'"):
        sc_c2s.prompts.cell_sentence(["cd3e"], upper="False")
    adata.obsm["c2s_genes"] = pd.DataFrame(adata.obsm["c2s_genes"], index=adata.obs_names)
    with pytest.raises(TypeError, match=r"^`obsm\['c2s_genes'\]` holds a DataFrame, not the array of gene indices"):
        sc_c2s.pl.rank_fit(adata, show=False)


CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "c2s_metadata.json"]


@settings(HOSTILE, max_examples=20 * SCALE)
@given(data=st.data())
def test_load_broken_checkpoints(data, tmp_path_factory, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    clean = data.draw(st.booleans())
    path = tmp_path_factory.mktemp("checkpoint") / "model"
    shutil.copytree(_registry.demo_dir(), path)
    expect = Expect()
    damage = st.tuples(st.sampled_from(CHECKPOINT_FILES), st.sampled_from(["delete", "empty", "truncate", "garbage"]))
    final = {}  # the last damage of each file is what the loader sees: a file emptied, then deleted, is missing
    for file, how in [] if clean else data.draw(st.lists(damage, max_size=2)):
        target = path / file
        if not target.exists():  # deleted already
            continue
        final[file] = how
        if how == "delete":
            target.unlink()
        elif how == "empty":
            target.write_bytes(b"")
        elif how == "truncate":
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
        else:
            target.write_bytes(b"\x00\xff garbage")
    for file, how in final.items():
        expect.bad(str(path), surely=not (how == "delete" and file in ("tokenizer_config.json", "c2s_metadata.json")))
    kwargs: dict[str, Any] = {}
    argument(data.draw, kwargs, expect, "device", [None, "cpu"], ["cuda", "gpu"], clean=clean)
    argument(data.draw, kwargs, expect, "dtype", [None, "float32", "bfloat16"], ["int8", "nonsense", 5], clean=clean)
    model = outcome(lambda: sc_c2s.models.load(path, **kwargs), expect, (ValueError, TypeError))
    if model is not FAILED:
        assert model.tokenizer.padding_side == "left"
        assert not model.model.training
        assert set(model.sha256) <= {p.name for p in path.iterdir()}


# --- the command line -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(ranked, tmp_path_factory) -> dict[str, Path]:
    """Input files and checkpoints, good and bad, for the command line."""
    root = tmp_path_factory.mktemp("cli")
    good = root / "cells.h5ad"
    plain = ranked.copy()
    for key in ("c2s",):
        del plain.uns[key]
    del plain.obsm["c2s_genes"]
    metadata = json.loads((_registry.demo_dir() / "c2s_metadata.json").read_text())
    plain.var_names = metadata["vocabulary"][: plain.n_vars]  # genes the demo model reads
    plain.write_h5ad(good)
    truncated = root / "truncated.h5ad"
    truncated.write_bytes(good.read_bytes()[:2000])
    (root / "table.csv").write_text("a,b\n1,2\n")
    (root / "notes.txt").write_text("a file")
    broken = root / "broken-model"
    shutil.copytree(_registry.demo_dir(), broken)
    (broken / "model.safetensors").write_bytes(b"")
    return {
        "good": good,
        "truncated": truncated,
        "csv": root / "table.csv",
        "missing": root / "missing.h5ad",
        "folder": root,
        "notes": root / "notes.txt",
        "broken": broken,
    }


@settings(HOSTILE, max_examples=15 * SCALE)
@given(data=st.data())
def test_command_line(cli_files, data, tmp_path_factory, capsys, monkeypatch):
    """A user mistake gives one line on stderr and a user-error status; a bug would raise out of `cli.main`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    clean = data.draw(st.booleans())
    out_dir = tmp_path_factory.mktemp("out")
    mistakes = []

    def option(good: list, bad: list) -> Any:
        value, is_bad = pick(data.draw, good, bad, clean=clean)
        if is_bad:
            mistakes.append(value)
        return value

    command = data.draw(st.sampled_from(["annotate", "generate"]))
    model = option(["demo"], ["broken", "missing-dir", "nope"])
    model = {"broken": str(cli_files["broken"]), "missing-dir": str(out_dir / "no" / "model")}.get(model, model)
    out = {
        "good": out_dir / "result.h5ad",
        "under-file": cli_files["notes"] / "result.h5ad",
        "folder": out_dir,
        "h5mu": out_dir / "result.h5mu",
    }[option(["good"], ["under-file", "folder", "h5mu"])]
    argv = ["-q", command, "--model", model, "--out", str(out), "--n-genes", option(["3"], ["0"])]
    if command == "annotate":
        argv.insert(2, str(cli_files[option(["good"], ["truncated", "csv", "missing", "folder"])]))
        argv += ["--labels", *data.draw(st.sampled_from([["model"], ["CD19+ B", "CD14+ Monocyte"]]))]
    else:
        argv += ["--cell-types", option(["CD19+ B=1", "CD14+ Monocyte"], ["CD19+ B=0", "B=two"])]
    for flag, good, bad in [("--device", [None, "cpu"], ["cuda"]), ("--batch-size", [None, "2"], ["0"])]:
        value = option(good, bad)
        argv += [flag, value] if value is not None else []

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code = cli.main(argv)
    err = capsys.readouterr().err
    event(f"exit status {code}")
    if not mistakes:
        assert code == cli.EXIT_OK, err
        assert err == ""
        assert out.is_file()
    else:
        assert code in (cli.EXIT_USAGE, cli.EXIT_MISSING, cli.EXIT_UNKNOWN_MODEL), (code, err)
        assert err.count("\n") == 1, err
        assert err.startswith("sc-c2s: error: ")
        assert not out.is_file()
