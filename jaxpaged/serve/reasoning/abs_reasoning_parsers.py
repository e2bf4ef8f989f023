"""`ReasoningParser`: a reasoning model's `<think>...</think>` block split from its answer.

`scan(text, final)` reads a reply's reasoning and content so far; both only grow as the text
grows (an end that may still become a tag is held back), so a stream is the difference
between successive scans and its pieces concatenate to `extract_reasoning_content`'s."""
from __future__ import annotations

import dataclasses

from jaxpaged.engine.structured_output.reasoning import THINK_TAGS
from jaxpaged.serve.chat_outputs import DeltaMessage
from jaxpaged.serve.tool_parsers.utils import partial_suffix


@dataclasses.dataclass
class ReasoningOutput:
    reasoning_content: str | None
    content: str | None


class ReasoningParser:
    """One instance per choice. The reply starts inside the block when `prompt_opened` (the chat
    template put the start tag in the prompt, as Qwen3's thinking models' do) or when the model
    always reasons first (`reasons_first`); else it may open the block with the start tag. A
    block never closed is all reasoning."""
    start_token, end_token = THINK_TAGS  # the engine core's grammars wait for the same end
    reasons_first = False

    def __init__(self, prompt_opened: bool = False):
        self.in_reasoning = prompt_opened or self.reasons_first
        self._text = ""
        self._sent = ReasoningOutput("", "")

    @classmethod
    def prompt_opens(cls, prompt: str) -> bool:
        """Whether the prompt ends inside a reasoning block (its last start tag is not closed)."""
        return prompt.rfind(cls.start_token) > prompt.rfind(cls.end_token)

    def scan(self, text: str, final: bool) -> ReasoningOutput:
        """The reasoning and content of `text` so far (`final`: nothing follows it)."""
        lead = text.lstrip()
        start = len(text) - len(lead)
        if lead.startswith(self.start_token):
            start += len(self.start_token)
        elif not final and self.start_token.startswith(lead):
            return ReasoningOutput("", "")  # may still be the start tag
        elif self.in_reasoning:
            start = 0
        else:
            return ReasoningOutput("", text)
        end = text.find(self.end_token, start)
        if end >= 0:
            return ReasoningOutput(text[start:end], text[end + len(self.end_token):])
        return ReasoningOutput(text[start:] if final else text[start:len(text) - partial_suffix(text, self.end_token)], "")

    def extract_reasoning_content(self, model_output: str) -> ReasoningOutput:
        out = self.scan(model_output, final=True)
        return ReasoningOutput(out.reasoning_content or None, out.content or None)

    def extract_reasoning_content_streaming(self, delta_text: str, finished: bool = False) -> DeltaMessage | None:
        """The stream's next piece after `delta_text` (`finished`: the reply ended)."""
        self._text += delta_text
        out = self.scan(self._text, finished)
        delta = DeltaMessage(content=out.content[len(self._sent.content):] or None,
                             reasoning_content=out.reasoning_content[len(self._sent.reasoning_content):] or None)
        self._sent = out
        return delta if delta else None
