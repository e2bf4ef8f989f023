"""`ToolParser`: a model family's tool-call format, parsed from a whole reply or a stream.

`scan(text, final)` reads the content and the tool calls of a reply's text so far. Both only
grow as the text grows (content ending in what may still become a marker is held back; a
call's arguments are the model's own JSON text of them, read up to where the text ends), so
the stream is the difference between successive scans, and its pieces concatenate to what
`extract_tool_calls` returns for the whole text."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxpaged.serve.chat_outputs import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
    FunctionCall,
    ToolCall,
    random_tool_call_id,
)
from jaxpaged.serve.tool_parsers.utils import (
    NotToolCall,
    PartialToolCall,
    is_json_object,
    partial_suffix,
    skip_ws,
)


@dataclasses.dataclass
class ToolCallScan:
    """A reply's text so far: the content that later text cannot change, and the calls."""
    content: str
    calls: list[PartialToolCall] = dataclasses.field(default_factory=list)


class ToolParser:
    """A format: calls start after the first of `markers`, or, with no marker in the reply,
    where its first non-space character is `bare_start` (the form a marker that is a special
    token leaves once `skip_special_tokens` drops it). Subclasses read the calls there
    (`scan_calls`); one instance per choice (a stream keeps its state here)."""
    markers: tuple[str, ...] = ()
    bare_start: str | None = None
    make_id: Callable[[], str] = staticmethod(random_tool_call_id)

    def __init__(self) -> None:
        self._text = ""
        self._sent_content = ""
        self._sent: list[tuple[str, int]] = []  # per streamed call: its id, characters of arguments sent
        self._stopped = False

    def scan_calls(self, text: str, i: int, final: bool) -> list[PartialToolCall]:
        """The calls from text[i] (just after the marker, or at the bare start); NotToolCall
        when the text cannot be calls of this format."""
        raise NotImplementedError

    def scan(self, text: str, final: bool) -> ToolCallScan:
        """The content and calls of `text` so far (`final`: nothing follows it)."""
        found = [(k, m) for m in self.markers if (k := text.find(m)) >= 0]
        if found:
            k, marker = min(found)
            content, i = text[:k], k + len(marker)
        else:
            i = skip_ws(text, 0)
            if self.bare_start is None or i == len(text) or text[i] != self.bare_start:
                return self._content_only(text, final)
            content = ""  # the spaces before a bare call section
        try:
            return ToolCallScan(content, self.scan_calls(text, i, final))
        except NotToolCall:
            return self._content_only(text, final)

    def _content_only(self, text: str, final: bool) -> ToolCallScan:
        """No calls (yet): the text is content, less an end that may still open a call section."""
        if final:
            return ToolCallScan(text)
        if self.bare_start is not None and not text.strip():
            return ToolCallScan("")
        return ToolCallScan(text[:len(text) - max((partial_suffix(text, m) for m in self.markers), default=0)])

    def _scan_final(self, text: str) -> ToolCallScan:
        """The whole reply: its calls, or all of it as content when any call is malformed
        (unclosed, without a name, arguments that are not a JSON object)."""
        scan = self.scan(text, final=True)
        if scan.calls and all(c.complete and is_json_object(c.arguments) for c in scan.calls):
            return scan
        return ToolCallScan(text)

    def extract_tool_calls(self, model_output: str) -> ExtractedToolCallInformation:
        """A whole reply: its tool calls and the content before them (or no calls and all content)."""
        scan = self._scan_final(model_output)
        calls = [ToolCall(FunctionCall(c.name, c.arguments), id=self.make_id()) for c in scan.calls]
        return ExtractedToolCallInformation(bool(calls), calls, scan.content or None)

    def extract_tool_calls_streaming(self, delta_text: str, finished: bool = False) -> DeltaMessage | None:
        """The stream's next piece after `delta_text` (`finished`: the reply ended): new
        content, then each call's name (with its id, type and index) once complete, then its
        argument fragments. A reply that stops parsing as calls after some were sent sends
        nothing more (non-streaming, the same reply is all content)."""
        self._text += delta_text
        if self._stopped:
            return None
        scan = self._scan_final(self._text) if finished else self.scan(self._text, False)
        if len(scan.calls) < len(self._sent) or not scan.content.startswith(self._sent_content):
            self._stopped = True
            return None
        delta = DeltaMessage(content=scan.content[len(self._sent_content):] or None)
        self._sent_content = scan.content
        for index, call in enumerate(scan.calls):
            if index == len(self._sent):
                if call.name is None:
                    break
                self._sent.append((self.make_id(), len(call.arguments)))
                delta.tool_calls.append(DeltaToolCall(index, DeltaFunctionCall(call.name, call.arguments),
                                                      self._sent[index][0], "function"))
            elif len(call.arguments) > self._sent[index][1]:
                delta.tool_calls.append(DeltaToolCall(index, DeltaFunctionCall(
                    arguments=call.arguments[self._sent[index][1]:])))
                self._sent[index] = (self._sent[index][0], len(call.arguments))
        return delta if delta else None

    @property
    def tools_called(self) -> bool:
        """Whether the stream has sent a tool call."""
        return bool(self._sent)
