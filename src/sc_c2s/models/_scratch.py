"""Small C2S models built from nothing: one token per gene, label word and template word.

A word-level tokenizer keeps sentences short (200 genes are 200 tokens, not ~800 sub-words), so a few-million
parameter GPT-NeoX trains in minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..prompts import TEMPLATE_WORDS

if TYPE_CHECKING:
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
#: Punctuation split off the end of a word: the period after a sentence or answer, the colon after a cue.
_TRAILING_PUNCTUATION = r"[.:,]$"


def build_tokenizer(
    genes: Sequence[str], labels: Sequence[str] = (), *, max_genes: int = 200
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `genes`, the words of `labels`, the template words and gene counts.

    Words are split on whitespace; a trailing ``.``, ``:`` or ``,`` becomes its own token, so gene names with
    inner dots (``RP11-34P13.3``) stay whole. The tokenizer pads on the left, for batched generation.
    """
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    label_words = (word for label in labels for word in label.split())
    numbers = (str(i) for i in range(max_genes + 1))
    words = dict.fromkeys([PAD, UNK, EOS, ".", ":", ",", *TEMPLATE_WORDS, *numbers, *label_words, *genes])
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_TRAILING_PUNCTUATION), behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        bos_token=EOS,
        padding_side="left",
        model_max_length=max_genes * 2 + 128,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    max_length: int | None = None,
    seed: int = 0,
) -> GPTNeoXForCausalLM:
    """A small GPT-NeoX (the Pythia architecture) with random weights for `tokenizer`'s vocabulary."""
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
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)
