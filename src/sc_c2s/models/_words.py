"""Writing words of a fixed vocabulary with a sub-word tokenizer, each word at most once.

With a tokenizer that splits a gene into several tokens (``▁CD``, ``3``, ``D`` with Gemma's), a sentence of
distinct genes cannot be had by blocking tokens that were used: ``▁CD`` starts many genes. Instead, each row of
a batch follows the token sequences of the vocabulary's words: while a word is being written only tokens that
continue one of the words it may still become are allowed; a new word or the end of the sentence may follow
only a complete word; a complete word is never started again. The first word may have a spelling of its own (an
answer that follows its prompt without a space spells ``CD74`` ``CD``, ``74`` where a later word is ``ĠCD``,
``74``); a word written in one spelling is not written again in the other. All rows advance together, vectorised
over the vocabulary, on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def distinct_words(sequences: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Return the token sequences of the words that can be written, each once: empty ones dropped, repeats once."""
    return list(dict.fromkeys(tuple(seq) for seq in sequences if len(seq)))


class WordTrie:
    """The token sequences of a vocabulary's words, padded into a matrix (spellings × longest), on a device.

    Parameters
    ----------
    sequences
        Tokens of each word as it is written after a space. Words of no tokens are dropped; sequences that are
        the same (one word written twice in the vocabulary) are kept once.
    n_logits
        Width of the model's output: the tokens that can be allowed.
    stop_ids
        Tokens that end the sentence.
    device
        Where the matrices live.
    opening
        Tokens of each word (in the order of `sequences`) as it is written first, where that differs: at the start
        of an answer that follows its prompt without a space. ``None``: the first word is spelt as the others.
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        n_logits: int,
        stop_ids: Sequence[int],
        device,
        opening: Sequence[Sequence[int]] | None = None,
    ):
        import torch

        spellings = {tuple(seq): tuple(first) for seq, first in zip(sequences, opening or sequences, strict=True)}
        unique = distinct_words(spellings)
        if not unique:
            msg = "No word of the vocabulary can be written with this tokenizer."
            raise ValueError(msg)
        self.n_words = n_words = len(unique)
        if opening is not None:
            unique += [spellings[seq] for seq in unique]  # row n_words + i: word i as written first
        width = max(map(len, unique))
        self.tokens = torch.full((len(unique), width), -1, dtype=torch.long)
        for i, seq in enumerate(unique):
            self.tokens[i, : len(seq)] = torch.as_tensor(seq)
        self.tokens = self.tokens.to(device)
        self.lengths = torch.as_tensor([len(seq) for seq in unique], device=device)
        rows = torch.arange(len(unique), device=device)
        self.later = rows < n_words
        """Spellings written after a space: all but the first word of a sentence."""
        self.opening = rows >= n_words if opening is not None else self.later
        """Spellings of the first word."""
        self.n_logits = n_logits
        self.is_stop = torch.zeros(n_logits, dtype=torch.bool, device=device)
        self.is_stop[list(stop_ids)] = True
        self.is_first = torch.zeros(n_logits, dtype=torch.bool, device=device)
        """Tokens that begin a word after a space."""
        self.is_first[self.tokens[self.later, 0]] = True
        self.opens = self.is_first
        """Tokens that begin the first word."""
        if opening is not None:
            self.opens = torch.zeros(n_logits, dtype=torch.bool, device=device)
            self.opens[self.tokens[self.opening, 0]] = True

    def __len__(self) -> int:
        """Spellings of words: one per word, two where the first word is spelt otherwise."""
        return len(self.lengths)


class WordConstraint:
    """The state of each row of a batch as it writes words of a :class:`WordTrie`, and the tokens it may write.

    Call :meth:`allowed` for the mask of the next tokens, then :meth:`advance` with the chosen tokens.

    Parameters
    ----------
    trie
        The vocabulary.
    n_rows
        Rows of the batch.
    n_words
        With a number (or one per row), a row may end its sentence only after that many words and may start no
        more; ``None`` lets it end after any complete word.
    """

    def __init__(self, trie: WordTrie, n_rows: int, *, n_words: int | torch.Tensor | None = None):
        import torch

        device = trie.tokens.device
        self.trie, self.n_words = trie, n_words
        self.candidates = torch.zeros((n_rows, len(trie)), dtype=torch.bool, device=device)
        """Spellings the current word of each row can still become."""
        self.used = torch.zeros_like(self.candidates)
        """Spellings of the words each row has written (both spellings of each)."""
        self.position = torch.zeros(n_rows, dtype=torch.long, device=device)
        """Tokens of the current word written so far (``0``: before the first word)."""
        self.words = torch.zeros(n_rows, dtype=torch.long, device=device)
        """Words begun so far."""

    def _in_any_spelling(self, spellings: torch.Tensor) -> torch.Tensor:
        """Rows × spellings: every spelling of the words of which `spellings` (rows × spellings) holds one."""
        import torch

        n_words = self.trie.n_words
        if n_words == len(self.trie):  # one spelling per word
            return spellings
        words = spellings[:, :n_words] | spellings[:, n_words:]  # spelling n_words + i is word i
        return torch.cat([words, words], dim=1)

    def _spelt_here(self) -> torch.Tensor:
        """Rows × spellings: those a new word of each row may take (the first word's, or those after a space)."""
        import torch

        trie = self.trie
        if trie.n_words == len(trie):  # one spelling per word, for any word
            return trie.later[None]
        return torch.where((self.words == 0)[:, None], trie.opening[None], trie.later[None])

    def _complete(self) -> torch.Tensor:
        """Rows × spellings: the spelling that the tokens of the current word spell in full."""
        return self.candidates & (self.trie.lengths[None] == self.position[:, None])

    def allowed(self) -> torch.Tensor:
        """Rows × logits: the tokens each row may write next."""
        import torch

        trie, n_rows = self.trie, len(self.position)
        complete = self._complete()
        is_complete = complete.any(1)
        allowed = torch.zeros((n_rows, trie.n_logits + 1), dtype=torch.bool, device=self.position.device)
        nowhere = trie.n_logits  # a column that is dropped: where words that are not allowed point
        # continue the current word
        column = self.position.clamp(max=trie.tokens.shape[1] - 1)
        following = trie.tokens.T[column]
        continues = self.candidates & (trie.lengths[None] > self.position[:, None])
        allowed.scatter_(1, torch.where(continues, following, nowhere), True)
        # begin a new word, never one already written
        more = self.words < self.n_words if self.n_words is not None else torch.ones_like(is_complete)
        may_begin = ((self.position == 0) | is_complete) & more
        begins = may_begin[:, None] & ~(self.used | self._in_any_spelling(complete)) & self._spelt_here()
        allowed.scatter_(1, torch.where(begins, trie.tokens[:, 0][None], nowhere), True)
        allowed = allowed[:, :-1]
        # end the sentence after a complete word (and enough words); where nothing else is left, always
        enough = self.words >= self.n_words if self.n_words is not None else torch.ones_like(is_complete)
        may_stop = (is_complete & enough) | ~allowed.any(1)
        return allowed | (may_stop[:, None] & trie.is_stop[None])

    def advance(self, token: torch.Tensor) -> None:
        """Move each row on by its chosen token (tokens outside the words, as stops or padding, change nothing)."""
        import torch

        trie = self.trie
        begins = torch.where(self.words == 0, trie.opens[token], trie.is_first[token]) & ~trie.is_stop[token]
        self.used |= self._in_any_spelling(begins[:, None] & self._complete())  # the word just completed
        column = self.position.clamp(max=trie.tokens.shape[1] - 1)
        continued = self.candidates & (trie.tokens.T[column] == token[:, None])
        started = (trie.tokens[:, 0][None] == token[:, None]) & ~self.used & self._spelt_here()
        self.candidates = torch.where(begins[:, None], started, continued)
        self.position = torch.where(begins, 1, self.position + 1)
        self.words += begins
