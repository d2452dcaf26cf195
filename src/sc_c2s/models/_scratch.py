"""Small C2S models built from nothing: one token per gene, label word and template word.

A word-level tokenizer keeps sentences short (200 genes are 200 tokens, not ~800 sub-words), so a few-million
parameter GPT-NeoX trains in minutes on a CPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sc_c2s.prompts import TEMPLATE_WORDS

from ._runtime import keep_random_state, seed_torch

if TYPE_CHECKING:
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
#: Model size by number of training cells: (fewer than this many cells, size).
_SIZES = (
    (10_000, {"hidden_size": 128, "n_layers": 2, "n_heads": 4}),
    (100_000, {"hidden_size": 256, "n_layers": 4, "n_heads": 8}),
    (float("inf"), {"hidden_size": 512, "n_layers": 6, "n_heads": 8}),
)
#: Punctuation split off the end of a word: the period after a sentence or answer, the colon after a cue.
_TRAILING_PUNCTUATION = r"[.:,]$"
#: The space that decoding puts before such punctuation, as before every token of a word-level tokenizer.
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.:,])")


def join_punctuation(text: str) -> str:
    """Join punctuation to the word before it again, as :func:`build_tokenizer` decodes it apart.

    >>> join_punctuation("T cells , CD4+ .")
    'T cells, CD4+.'
    """
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)


def build_tokenizer(
    genes: Sequence[str],
    labels: Sequence[str] = (),
    *,
    max_genes: int = 200,
    max_cells: int = 0,
    max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over `genes`, the words of `labels`, the template words and gene counts.

    Numbers up to `max_genes` and `max_cells` are words (counts in prompts, cells of multi-cell samples). The
    longest sequence has room for prompt and answer of `max_genes` genes each, or `max_length` tokens where that is
    more (multi-cell samples).

    Words are split on whitespace; a trailing ``.``, ``:`` or ``,`` becomes its own token, so gene names with
    inner dots (``RP11-34P13.3``) stay whole. The tokenizer pads on the left, for batched generation.
    """
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_TRAILING_PUNCTUATION), behavior="isolated")]
    )
    # split labels and genes as text will be, so that e.g. "T cells, CD4+" yields "cells" and ","; a label is also
    # read with the period that ends an answer or a prompt's sentence, so that "cell." in "T cell.." is a word
    texts = (*labels, *(f"{label}." for label in labels), *genes)
    text_words = (word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text))
    numbers = (str(i) for i in range(max(max_genes, max_cells) + 1))
    words = dict.fromkeys([PAD, UNK, EOS, ".", ":", ",", *TEMPLATE_WORDS, *numbers, *text_words])
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        bos_token=EOS,
        padding_side="left",
        model_max_length=max(max_length or 0, max_genes * 2 + 128),
    )


@keep_random_state()
def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    max_length: int | None = None,
    dropout: float = 0.1,
    attention_dropout: float = 0.0,
    seed: int = 0,
) -> GPTNeoXForCausalLM:
    """Build a small GPT-NeoX (the Pythia architecture) with random weights for `tokenizer`'s vocabulary.

    `dropout` applies to hidden states in training: with a few thousand cells, a model trained from nothing
    overfits without it. `attention_dropout` applies to attention weights; it is off by default because it makes
    PyTorch's attention draw a random mask over every batch × head × position² weight outside its fused kernels,
    which about doubles the time of a training step on a CPU. The weights are drawn from torch's global generator
    seeded with `seed`; the caller's random state is given back after.
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_length or tokenizer.model_max_length,
        rotary_pct=0.25,
        use_parallel_residual=True,
        attention_dropout=attention_dropout,
        hidden_dropout=dropout,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    seed_torch(seed, torch.device("cpu"))  # the weights are drawn on the CPU
    return GPTNeoXForCausalLM(config)


def scratch_size(n_cells: int) -> dict[str, int]:
    """Width, depth and attention heads of a from-scratch model for `n_cells` training cells.

    Up to 10,000 cells train a 2-layer, 128-wide model (about a million parameters with a 2,000-gene
    vocabulary; narrower ones learn more slowly per epoch) in minutes on a CPU; more cells get a wider and deeper
    model.
    """
    return dict(next(size for limit, size in _SIZES if n_cells < limit))
