"""The per-row allowed-token bitmask of the masked and `full` heads, built on the host each
step (for a late step on the runner's dispatch worker: `TokenBitmaskJob`).

Layout: `[S, ceil(V / 32)]` int32, bit `v % 32` of word `v // 32` set = token v allowed
(xgrammar's, read on the device by `sampler.apply_token_bitmask`). A row starts from what its
structured-output grammar allows next (else every token), keeps only its `allowed_token_ids`
and loses the tokens its `bad_words` ban at this step.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.engine.structured_output.request import StructuredOutputRequest, fill_grammar_bitmask


def num_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


@functools.lru_cache(maxsize=256)
def _allowed_words(allowed: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """The bitmask row allowing exactly `allowed` (cached: a request sends the same list every step)."""
    bits = np.zeros(num_words(vocab_size) * 32, bool)
    bits[list(allowed)] = True
    words = np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)
    words.flags.writeable = False
    return words


def bad_word_bans(bad_words_token_ids: Sequence[Sequence[int]], output_ids: Sequence[int]) -> list[int]:
    """vLLM's bad-words rule: a word's last token is banned when the generated tokens end with
    the word's other tokens; a one-token word is always banned. Prompt tokens do not count."""
    bans = []
    for word in bad_words_token_ids:
        k = len(word) - 1
        if k <= len(output_ids) and (k == 0 or list(output_ids[-k:]) == list(word[:-1])):
            bans.append(word[-1])
    return bans


def make_token_bitmask(rows: Sequence[tuple[SamplingParams, Sequence[int]]], num_seqs: int, vocab_size: int,
                       grammars: Sequence[StructuredOutputRequest | None] = (),
                       out: np.ndarray | None = None) -> np.ndarray:
    """`[num_seqs, ceil(V / 32)]` int32 from per-row `(params, output token ids)` and grammars
    (row i's, or None); padding rows and rows without constraints allow every token. Written
    into `out` when given (e.g. a view of a packed step buffer)."""
    mask = np.empty((num_seqs, num_words(vocab_size)), np.int32) if out is None else out
    mask.fill(-1)
    fill_grammar_bitmask(mask, grammars)
    for i, (p, output_ids) in enumerate(rows):
        if p.allowed_token_ids:
            mask[i] &= _allowed_words(tuple(p.allowed_token_ids), vocab_size)
        if p.bad_words_token_ids:
            bans = np.asarray(bad_word_bans(p.bad_words_token_ids, output_ids), np.int64)
            row = mask[i].view(np.uint32)
            np.bitwise_and.at(row, bans >> 5, ~np.left_shift(np.uint32(1), (bans & 31).astype(np.uint32)))
    return mask


@dataclasses.dataclass
class TokenBitmaskJob:
    """A step's bitmask, to fill later (`run`): the rows' params with the output ids their bad
    words read (copied when the job is made) and their grammars. Only the processing of the
    step's own sampled tokens advances those grammars, so the fill may run on another thread
    until then."""
    rows: list[tuple[SamplingParams, Sequence[int]]]
    grammars: list[StructuredOutputRequest | None]
    num_seqs: int
    vocab_size: int

    def run(self, out: np.ndarray | None = None) -> np.ndarray:
        return make_token_bitmask(self.rows, self.num_seqs, self.vocab_size, self.grammars, out)
