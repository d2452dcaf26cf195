"""`sc_c2s.tl.from_sentences`: text back to expression."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sc_c2s
from sc_c2s._rank_model import RankFit
from sc_c2s.tl import _from_sentences

GENES = ["CD3D", "CD3E", "HLA-A", "RP11-34P13.7", "IL7R", "Cd4"]
FIT = {"slope": -1.0, "intercept": 2.0}


def expression(position: int) -> float:
    """The fit's value at a 0-based position: 2 - log10(1 + p), clipped at 0."""
    return max(0.0, 2.0 - np.log10(1 + position))


def dense(cells) -> np.ndarray:
    return cells.X.toarray()


def counts(cells) -> list[list[int]]:
    return cells.obs[["n_valid_genes", "n_unknown_words", "n_duplicate_genes"]].to_numpy().tolist()


def test_plain_sentence():
    cells = sc_c2s.tl.from_sentences(["IL7R CD3D HLA-A"], genes=GENES, rank_fit=FIT)
    expected = np.zeros((1, len(GENES)), dtype=np.float32)
    expected[0, [4, 0, 2]] = [expression(0), expression(1), expression(2)]
    np.testing.assert_allclose(dense(cells), expected, rtol=1e-6)
    assert cells.X.dtype == np.float32
    assert cells.var_names.tolist() == GENES
    assert cells.obs_names.tolist() == ["0"]
    assert counts(cells) == [[3, 0, 0]]
    assert cells.uns["c2s_rank_fit"]["slope"] == -1.0


def test_punctuation_and_trailing_period():
    """Commas, quotes, brackets and the final period go; hyphens and dots inside gene names stay."""
    text = '"IL7R", (CD3D); HLA-A: RP11-34P13.7.'
    cells = sc_c2s.tl.from_sentences([text], genes=GENES, rank_fit=FIT)
    row = dense(cells)[0]
    for position, gene in enumerate(["IL7R", "CD3D", "HLA-A", "RP11-34P13.7"]):
        assert row[GENES.index(gene)] == pytest.approx(expression(position))
    assert counts(cells) == [[4, 0, 0]]


def test_genes_that_begin_or_end_with_punctuation():
    """Drosophila genes such as Su(H) used to lose their brackets, be unknown and shift the positions after them."""
    genes = ["Su(H)", "E(z)", "E(spl)m3-HLH", "Act5C", "RpL32", "l(2)gl"]
    adata = ad.AnnData(np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], dtype=np.float32))
    adata.var_names = genes
    sc_c2s.pp.to_sentences(adata, rank_fit=False)
    sentences = [*adata.obs["c2s_sentence"], "Su(H), (Act5C) E(z). l(2)gl: (Su(H))"]
    cells = sc_c2s.tl.from_sentences(sentences, genes=adata.uns["c2s"]["genes"], rank_fit=FIT)
    positions = [expression(p) for p in range(6)]
    np.testing.assert_allclose(dense(cells)[:2], [positions, positions[::-1]], rtol=1e-6)
    # a closing period, comma or colon goes; "(Act5C)" is stripped to a gene; "(Su(H))" is neither
    np.testing.assert_allclose(dense(cells)[2], [expression(0), expression(2), 0, expression(1), 0, expression(3)])
    assert counts(cells) == [[6, 0, 0], [6, 0, 0], [4, 1, 0]]


def test_genes_whose_names_end_in_punctuation_read_back():
    """``B.`` lost its period, so its position went to ``B``, and ``GENE.`` was an unknown word."""
    adata = ad.AnnData(np.array([[4, 3, 2, 1]], dtype=np.float32))
    adata.var_names = ["GENE.", "B.", "B", "X:"]
    sc_c2s.pp.to_sentences(adata, rank_fit=False)
    cells = sc_c2s.tl.from_sentences(adata.obs["c2s_sentence"], genes=adata.uns["c2s"]["genes"], rank_fit=FIT)
    np.testing.assert_allclose(dense(cells)[0], [expression(p) for p in range(4)], rtol=1e-6)
    assert counts(cells) == [[4, 0, 0]]


def test_unknown_words_are_dropped_and_counted():
    """Unknown words do not take a position; words that are only punctuation are not words."""
    cells = sc_c2s.tl.from_sentences(["FOO CD3D - bar ... CD3E XIST."], genes=GENES, rank_fit=FIT)
    row = dense(cells)[0]
    assert row[0] == pytest.approx(expression(0))
    assert row[1] == pytest.approx(expression(1))
    assert counts(cells) == [[2, 3, 0]]  # FOO, bar, XIST; "-" and "..." are no words


def test_duplicates_keep_the_first_position():
    cells = sc_c2s.tl.from_sentences(["CD3E CD3D CD3E IL7R CD3D CD3D"], genes=GENES, rank_fit=FIT)
    row = dense(cells)[0]
    assert row[1] == pytest.approx(expression(0))
    assert row[0] == pytest.approx(expression(1))
    assert row[4] == pytest.approx(expression(2))  # positions count kept genes only
    assert counts(cells) == [[3, 0, 3]]


def test_case_is_ignored():
    cells = sc_c2s.tl.from_sentences(["cd3d Cd3E CD4 hla-a"], genes=GENES, rank_fit=FIT)
    row = dense(cells)[0]
    np.testing.assert_allclose(row[[0, 1, 5, 2]], [expression(p) for p in range(4)], rtol=1e-6)
    assert counts(cells) == [[4, 0, 0]]


def test_case_insensitive_duplicates():
    cells = sc_c2s.tl.from_sentences(["CD3D cd3d"], genes=GENES, rank_fit=FIT)
    assert counts(cells) == [[1, 0, 1]]


def test_vocabulary_names_differing_by_case_match_the_first():
    cells = sc_c2s.tl.from_sentences(["cd4"], genes=["CD4", "Cd4"], rank_fit=FIT)
    np.testing.assert_allclose(dense(cells), [[2.0, 0.0]])


def test_empty_and_missing_sentences():
    sentences = pd.Series(["", "   ", None, np.nan, "CD3D"], index=list("abcde"))
    cells = sc_c2s.tl.from_sentences(sentences, genes=GENES, rank_fit=FIT)
    assert cells.obs_names.tolist() == list("abcde")
    assert counts(cells) == [[0, 0, 0]] * 4 + [[1, 0, 0]]
    assert dense(cells)[:4].sum() == 0


def test_whitespace_of_any_kind_separates_words():
    cells = sc_c2s.tl.from_sentences(["CD3D\tCD3E\nIL7R  HLA-A"], genes=GENES, rank_fit=FIT)
    assert counts(cells) == [[4, 0, 0]]


def test_prediction_clipped_at_zero_keeps_the_gene_valid():
    """Far down the sentence the line goes below 0: expression 0 (not stored), still counted as valid."""
    fit = {"slope": -1.0, "intercept": 0.5}  # 0 from position 3 on
    cells = sc_c2s.tl.from_sentences([" ".join(GENES)], genes=GENES, rank_fit=fit)
    row = dense(cells)[0]
    assert cells.X.nnz == 3
    np.testing.assert_allclose(row[:3], [0.5, 0.5 - np.log10(2), 0.5 - np.log10(3)], rtol=1e-6)
    assert np.all(row[3:] == 0)
    assert counts(cells) == [[6, 0, 0]]


def test_many_sentences_and_any_iterable():
    sentences = (s for s in ["CD3D", "IL7R CD3D", "XYZ"])
    cells = sc_c2s.tl.from_sentences(sentences, genes=pd.Index(GENES), rank_fit=RankFit(**FIT))
    assert cells.shape == (3, len(GENES))
    assert counts(cells) == [[1, 0, 0], [2, 0, 0], [0, 1, 0]]
    assert cells.obs_names.tolist() == ["0", "1", "2"]
    assert dense(cells)[1, 0] == pytest.approx(expression(1))


def test_no_sentences():
    cells = sc_c2s.tl.from_sentences([], genes=GENES, rank_fit=FIT)
    assert cells.shape == (0, len(GENES))


def test_round_trip_from_to_sentences(pbmc68k):
    sc_c2s.pp.to_sentences(pbmc68k, n_genes=100)
    c2s = pbmc68k.uns["c2s"]
    cells = sc_c2s.tl.from_sentences(pbmc68k.obs["c2s_sentence"], genes=c2s["genes"], rank_fit=c2s["rank_fit"])
    assert cells.obs_names.equals(pbmc68k.obs_names)
    assert (cells.obs["n_unknown_words"] == 0).all()
    assert (cells.obs["n_duplicate_genes"] == 0).all()
    genes = pbmc68k.obsm["c2s_genes"]
    np.testing.assert_array_equal(cells.obs["n_valid_genes"], (genes >= 0).sum(axis=1))
    fit = RankFit.from_dict(c2s["rank_fit"])
    X = dense(cells)
    for cell in [0, 350, 699]:
        row = genes[cell][genes[cell] >= 0]
        np.testing.assert_allclose(X[cell, row], fit.predict(np.arange(len(row))), rtol=1e-6)
        assert np.count_nonzero(X[cell]) == np.count_nonzero(fit.predict(np.arange(len(row))))


@pytest.mark.parametrize("genes", [GENES, ["CD4", "IL7R", "cd4", "Cd4", "CD3D"]], ids=["distinct", "alike by case"])
def test_indices_read_as_the_sentences_they_spell(genes):
    """The scores read real cells from their gene indices: what reading their sentences written out gives."""
    ranked = np.array([[4, 0, 2, -1], [3, 1, 2, 0], [-1, -1, -1, -1], [2, 3, 0, 1]])
    fit = {"slope": -1.0, "intercept": 0.5}  # 0 from position 3 on: such genes are not stored
    genes_of = np.asarray(genes, dtype=object)
    sentences = [" ".join(genes_of[row[row >= 0]]) for row in ranked]
    X = _from_sentences.reconstruct_ranked(ranked, genes=genes, rank_fit=fit)
    expected = sc_c2s.tl.from_sentences(sentences, genes=genes, rank_fit=fit).X
    assert X.dtype == np.float32
    assert (X != expected).nnz == 0
    np.testing.assert_array_equal(X.indptr, expected.indptr)


def test_one_string_is_refused():
    with pytest.raises(TypeError, match=r"`sentences` must be a list of sentences, not one string; wrap it in a list"):
        sc_c2s.tl.from_sentences("CD3D CD3E", genes=GENES, rank_fit=FIT)


def test_a_mapping_is_refused():
    """A dict of cell → sentence used to be iterated over its keys: cells named after their names, no genes."""
    with pytest.raises(TypeError) as error:
        sc_c2s.tl.from_sentences({"cell_a": "CD4 CD3D", "cell_b": "CD3E"}, genes=GENES, rank_fit=FIT)
    assert str(error.value) == (
        "`sentences` is a mapping, whose keys are not sentences: pass its values, `list(sentences.values())`, or a "
        "Series, `pd.Series(sentences)`, whose index names the cells."
    )
    cells = sc_c2s.tl.from_sentences(pd.Series({"cell_a": "CD3D IL7R", "cell_b": "CD3E"}), genes=GENES, rank_fit=FIT)
    assert cells.obs_names.tolist() == ["cell_a", "cell_b"]
    assert counts(cells) == [[2, 0, 0], [1, 0, 0]]


def test_a_data_frame_is_refused():
    """It was iterated over its column names: one cell of the unknown word "c2s_sentence"."""
    frame = pd.DataFrame({"c2s_sentence": ["CD4 CD3D", "CD3E"]})
    with pytest.raises(TypeError, match=r"a DataFrame, whose iteration gives its column names \('c2s_sentence'\)"):
        sc_c2s.tl.from_sentences(frame, genes=GENES, rank_fit=FIT)


def test_words_that_are_mostly_not_genes_warn(cellbench, scanpy_log):
    """Sentences written with gene symbols read over `var_names` (Ensembl IDs) used to give silently empty cells."""
    sc_c2s.pp.to_sentences(cellbench, gene_symbols="gene_symbol")
    sentences, fit = cellbench.obs["c2s_sentence"], cellbench.uns["c2s"]["rank_fit"]
    right = sc_c2s.tl.from_sentences(sentences, genes=cellbench.uns["c2s"]["genes"], rank_fit=fit)
    assert right.obs["n_unknown_words"].sum() == 0
    assert "WARNING" not in scanpy_log.getvalue()
    wrong = sc_c2s.tl.from_sentences(sentences, genes=cellbench.var_names, rank_fit=fit)
    n_words = right.obs["n_valid_genes"].sum()
    share = wrong.obs["n_unknown_words"].sum() / n_words
    assert wrong.obs[["n_valid_genes", "n_unknown_words"]].sum().sum() == n_words
    assert share > 0.5
    assert (
        f"WARNING: {share:.0%} of the words of the sentences are not genes of `genes`: are the sentences written "
        "with these gene names? For sentences of `sc_c2s.pp.to_sentences`, pass `genes=adata.uns['c2s']['genes']`, "
        "the names they were written with (symbols where it ran with `gene_symbols=`), rather than "
        "`adata.var_names`."
    ) in scanpy_log.getvalue()


def test_duplicated_genes_are_refused():
    with pytest.raises(ValueError, match=r"`genes` must be unique; duplicated: \['CD3D'\]"):
        sc_c2s.tl.from_sentences(["CD3D"], genes=["CD3D", "CD3D"], rank_fit=FIT)


def test_incomplete_fit_is_refused():
    with pytest.raises(ValueError, match=r"A rank fit needs 'slope' and 'intercept'"):
        sc_c2s.tl.from_sentences(["CD3D"], genes=GENES, rank_fit={"slope": -0.7})


@pytest.mark.parametrize(
    ("fit", "match"),
    [
        ({"slope": float("nan"), "intercept": 2.0}, r"`rank_fit\['slope'\]` must be a finite number, got nan"),
        ({"slope": -0.7, "intercept": float("inf")}, r"`rank_fit\['intercept'\]` must be a finite number, got inf"),
        ({"slope": "-0.7", "intercept": 2.0}, r"`rank_fit\['slope'\]` must be a finite number, got '-0.7'"),
        ([-0.7, 2.0], r"A rank fit needs 'slope' and 'intercept'"),
        (None, r"A rank fit needs 'slope' and 'intercept'"),
    ],
)
def test_fit_that_is_not_finite_is_refused(fit, match):
    """A NaN fit (as `to_sentences` used to store for data with +inf) used to give all-NaN expression."""
    with pytest.raises(ValueError, match=match):
        sc_c2s.tl.from_sentences(["CD3D"], genes=GENES, rank_fit=fit)


@pytest.mark.parametrize(("sentences", "genes", "match"), [(None, GENES, "sentences"), (["CD3D"], None, "genes")])
def test_arguments_that_are_not_lists(sentences, genes, match):
    with pytest.raises(TypeError, match=rf"`{match}` must be a list"):
        sc_c2s.tl.from_sentences(sentences, genes=genes, rank_fit=FIT)


@pytest.mark.parametrize("missing", [None, np.nan, pd.NA])
def test_missing_gene_names_are_refused(missing):
    """They used to become genes named 'None' or 'nan', which a sentence's word 'nan' then matched."""
    with pytest.raises(ValueError, match=r"`genes` has 1 missing names \(None or NaN; the first at position 1\)"):
        sc_c2s.tl.from_sentences(["CD3D nan"], genes=["CD3D", missing, "IL7R"], rank_fit=FIT)


def test_bytes_are_decoded_as_utf8():
    """h5py hands out strings as bytes; a sentence of bytes used to be read as the text "b'CD3D CD4'"."""
    cells = sc_c2s.tl.from_sentences([b"CD3D IFN-\xce\xb3", "CD3D"], genes=[b"CD3D", "IFN-γ"], rank_fit=FIT)
    assert cells.var_names.tolist() == ["CD3D", "IFN-γ"]
    assert counts(cells) == [[2, 0, 0], [1, 0, 0]]
    np.testing.assert_allclose(dense(cells)[0], [expression(0), expression(1)], rtol=1e-6)
    with pytest.raises(ValueError, match=r"A sentence is bytes that are not UTF-8 \(b'CD3D \\xff'\); decode it"):
        sc_c2s.tl.from_sentences([b"CD3D \xff"], genes=GENES, rank_fit=FIT)


def test_documented_uns_and_case():
    doc = " ".join(sc_c2s.tl.from_sentences.__doc__.split())
    assert '``uns["c2s_rank_fit"]``, the rank fit used' in doc
    assert "genes whose names differ only by case (e.g. ``CD4`` and ``Cd4``) are one word" in doc
    cells = sc_c2s.tl.from_sentences(["cd4 CD3D"], genes=["CD4", "Cd4", "CD3D"], rank_fit=FIT)
    assert set(cells.uns) == {"c2s_rank_fit", "log1p"}
    assert cells.uns["c2s_rank_fit"] == RankFit(**FIT).to_dict()
    np.testing.assert_allclose(dense(cells), [[expression(0), 0.0, expression(1)]])


def test_scanpy_reads_the_scale_of_the_cells():
    """Without `uns["log1p"]`, scanpy took the cells' log10(1 + x) for the natural log: the fold changes of
    `rank_genes_groups` came out smaller by a factor of log(10) in the exponent."""
    sentences = ["CD3D CD3E IL7R", "CD3D IL7R CD3E", "IL7R CD3E", "IL7R CD3E CD3D"]
    cells = sc_c2s.tl.from_sentences(sentences, genes=GENES, rank_fit=FIT)
    cells.obs["group"] = pd.Categorical(["a", "a", "b", "b"])
    sc.tl.rank_genes_groups(cells, "group", groups=["a"], reference="b", method="t-test")
    result = sc.get.rank_genes_groups_df(cells, group="a").set_index("names")
    means = {g: dense(cells[cells.obs["group"] == g, "CD3D"]).mean() for g in ("a", "b")}
    expected = np.log2((10 ** means["a"] - 1 + 1e-9) / (10 ** means["b"] - 1 + 1e-9))  # scanpy's formula, base 10
    assert result.loc["CD3D", "logfoldchanges"] == pytest.approx(expected, rel=1e-5)
