"""Where results live: every key this package reads or writes in an AnnData, defined once."""

from __future__ import annotations

#: ``uns`` entry of :func:`sc_c2s.pp.to_sentences`: its parameters, the ranked genes and the rank fit.
C2S = "c2s"
#: ``obsm`` entry of the ranked gene indices.
GENES = "c2s_genes"
#: ``obs`` column of the sentence strings (also of generated cells).
SENTENCE = "c2s_sentence"
#: Default ``key_added`` of :func:`sc_c2s.tl.annotate`.
CELL_TYPE = "c2s_cell_type"
#: Default ``key_added`` of :func:`sc_c2s.tl.predict_tissue`.
TISSUE = "c2s_tissue"
#: Default ``key_added`` of :func:`sc_c2s.tl.summarize`.
SUMMARY = "c2s_summary"
#: ``obs`` columns of the requested tissue and the sample of cells generated together.
GENERATED_TISSUE = "tissue"
GENERATED_SAMPLE = "sample"
#: Default ``key_added`` of :func:`sc_c2s.tl.embed`.
EMBEDDING = "X_c2s"
#: ``uns`` entry of the cells that :func:`sc_c2s.tl.generate` returns.
GENERATE = "c2s_generate"
#: ``uns`` entry of the rank fit in the cells that :func:`sc_c2s.tl.from_sentences` returns.
FROM_SENTENCES_RANK_FIT = "c2s_rank_fit"
#: scanpy's ``uns`` entry of the base of a ``log1p`` transform: cells read back from sentences, on the rank fit's
#: ``log10(1 + x)`` scale, carry ``{"base": 10}``, and data ranked by :func:`sc_c2s.pp.to_sentences` is read by it.
LOG1P = "log1p"
#: ``obs`` column of the requested cell type of generated cells.
GENERATED_CELL_TYPE = "cell_type"
#: ``obs`` column of the control cell each predicted perturbed cell comes from.
SOURCE_CELL = "c2s_source_cell"
#: ``uns`` entry of the cells that :func:`sc_c2s.tl.predict_perturbation` returns.
PREDICT_PERTURBATION = "c2s_predict_perturbation"

#: Keys of what the package writes for itself and reads back: no verb's ``key_added`` may replace them.
RESERVED = frozenset({C2S, GENES, SENTENCE, GENERATE, FROM_SENTENCES_RANK_FIT, SOURCE_CELL, PREDICT_PERTURBATION})
