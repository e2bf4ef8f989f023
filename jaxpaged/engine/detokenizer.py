"""Incremental detokenization and stop strings, with vLLM's semantics.

`IncrementalDetokenizer` turns generated token ids into text deltas; `StopChecker` finds stop
strings in the growing text, truncates at them and says how much text is safe to stream.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

PROMPT_CONTEXT = 5  # prompt tokens decoded as left context for the first output tokens (as vLLM)
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids -> text deltas, at a cost per token bounded by a short window of ids.

    vLLM's prefix/read offsets over `tokenizer.decode`: the window holds the ids since the last
    emitted text's context start (`ids[:read]`) plus the ids not yet emitted (`ids[read:]`). A
    step decodes both and emits what the whole window adds past the context. A decode ending in
    U+FFFD (a multi-byte character split across byte-level tokens, still incomplete) emits
    nothing and is retried with the next token, so a character comes out once, complete.
    The prompt's last tokens are the first context (for decoders whose spacing depends on the
    left neighbour), unless the prompt ends mid-character.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = [int(t) for t in prompt_token_ids[-PROMPT_CONTEXT:]]
        if self._decode(self._ids).endswith(REPLACEMENT):  # prompt ends mid-character: no context
            self._ids = []
        self._read = len(self._ids)
        self._text = ""
        # As vLLM with fast tokenizers: without spaces between special tokens, an added token
        # that directly follows another is emitted as its raw content (no decoder-made space).
        self._added: dict[int, str] = {} if skip_special_tokens or spaces_between_special_tokens else {
            i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._last_added = False

    @property
    def text(self) -> str:
        """All output text so far."""
        return self._text

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Appends generated token ids; returns the text they complete (possibly empty)."""
        delta = "".join(self._step(int(t)) for t in new_token_ids)
        self._text += delta
        return delta

    def flush(self) -> str:
        """Emits the text still pending once the sequence is finished (an incomplete last
        character as U+FFFD, as `tokenizer.decode` of all ids gives it); stop-check it too."""
        delta = self._emit(force=True)
        self._text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, token_id: int) -> str:
        self._ids.append(token_id)
        added = self._added.get(token_id)
        follows_added, self._last_added = self._last_added, added is not None
        delta = self._emit(force=False)
        return added if delta and added is not None and follows_added else delta

    def _emit(self, force: bool) -> str:
        prefix_text = self._decode(self._ids[:self._read])
        new_text = self._decode(self._ids)
        if not force and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT)):
            return ""
        del self._ids[:self._read]  # the emitted ids become the next step's context
        self._read = len(self._ids)
        return new_text[len(prefix_text):]


class StopUpdate(NamedTuple):
    """One step of stop handling.

    `delta`: text safe to stream now. `stop`: the stop string matched (the request is then
    finished), else None. `text`: the output text, truncated at the stop when one matched.
    """
    delta: str
    stop: str | None
    text: str


class StopChecker:
    """Stop strings over a growing output text, matched across token (delta) boundaries.

    A stop string counts when it ends within the newly added characters; among several, the
    one ending first wins (ties: the longest), as if text arrived character by character. The
    text is cut before the stop string, or after it with `include_stop_str_in_output`.
    While streaming, the longest suffix of the text that is a proper prefix of some stop string
    is held back (at most max(len(stop)) - 1 characters, as vLLM), so a client never receives
    text that a later match would cut. Nothing is held back when stop strings are included.
    """

    def __init__(self, stop: Sequence[str] | str | None = None, include_stop_str_in_output: bool = False):
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]
        self.include_stop_str_in_output = include_stop_str_in_output

    def find(self, text: str, num_new_chars: int) -> tuple[str, str] | None:
        """(stop string, truncated text) for a stop ending in the last `num_new_chars` of `text`."""
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self.stop if num_new_chars > 0 else ():
            i = text.find(s, max(len(text) - num_new_chars - len(s) + 1, 0))
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best[:2]):
                best = (i + len(s), -len(s), s)
        if best is None:
            return None
        end, _, s = best
        return s, text[:end if self.include_stop_str_in_output else end - len(s)]

    def held_back(self, text: str) -> int:
        """Trailing characters of `text` that may still become part of a stop string."""
        if self.include_stop_str_in_output:
            return 0
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)

    def update(self, text: str, num_new_chars: int, num_sent: int, finished: bool = False) -> StopUpdate:
        """Stop check and streaming step for the detokenizer's full `text`, whose last
        `num_new_chars` are new and first `num_sent` were already streamed. `finished` (EOS,
        length) releases the held-back text; a stop match also finishes and releases it."""
        match = self.find(text, num_new_chars)
        if match is not None:
            stop, text = match
            return StopUpdate(text[num_sent:], stop, text)
        end = len(text) if finished else len(text) - self.held_back(text)
        return StopUpdate(text[num_sent:max(end, num_sent)], None, text)
