"""`POST /v1/chat/completions`: messages through the chat template, assistant messages out."""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse, Response

from jaxpaged.engine.outputs import CompletionOutput, Logprob
from jaxpaged.engine.async_llm import AsyncLLM, Tokenizing
from jaxpaged.engine.processor import apply_chat_template
from jaxpaged.engine.structured_output.params import StructuredOutputsParams
from jaxpaged.serve.completions import prompt_logprobs_json, safe_logprob, token_text
from jaxpaged.serve.protocol import ChatCompletionRequest, ChatTemplateFields
from jaxpaged.serve.reasoning.abs_reasoning_parsers import ReasoningParser
from jaxpaged.serve.reply_parser import ReplyParser, request_tool_parser
from jaxpaged.serve.sse import sse_response
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.serve.tool_parsers.tool_choice import tool_choice_schema


UNTRUSTED_TEMPLATE = ("Chat template is passed with request, but --trust-request-chat-template is not set. "
                      "Refused request with untrusted chat template (`chat_template`).")


def render_chat(engine: Tokenizing, messages: list[dict], req: ChatTemplateFields, server_template: str | None,
                trust_request_template: bool = False) -> list[int]:
    """Token ids of a conversation through the request's template (only where the server trusts
    request templates, as vLLM's --trust-request-chat-template) or the server's
    (`AsyncLLM.tokenize`)."""
    if req.chat_template is not None and not trust_request_template:
        raise ValueError(UNTRUSTED_TEMPLATE)
    return apply_chat_template(engine.tokenizer, messages, req.chat_template or server_template,
                               req.add_generation_prompt, req.continue_final_message, req.chat_template_kwargs,
                               req.template_tools(), req.add_special_tokens)


def _chat_logprobs(out: CompletionOutput, top_n: int, as_ids: bool = False) -> dict:
    def item(token_id: int, lp: Logprob) -> dict:
        token = token_text(token_id, lp.decoded_token, as_ids)
        return {"token": token, "logprob": safe_logprob(lp.logprob), "bytes": list(token.encode())}

    content = []
    for tid, entry in zip(out.token_ids, out.logprobs or []):
        top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_n),
                     key=lambda t_lp: t_lp[1].rank)
        content.append({**item(tid, entry[tid]), "top_logprobs": [item(t, lp) for t, lp in top]})
    return {"content": content}


async def create_chat_completion(engine: AsyncLLM, req: ChatCompletionRequest, model: str,
                                 chat_template: str | None, trust_request_template: bool = False,
                                 tool_parser: type[ToolParser] | None = None,
                                 reasoning_parser: type[ReasoningParser] | None = None) -> Response:
    """`tool_parser`: the server's parser of "auto" tool calls (--tool-call-parser, with
    --enable-auto-tool-choice); `reasoning_parser`: its --reasoning-parser."""
    make_tool_parser = request_tool_parser(req, tool_parser)
    conv = req.conversation()
    prompt = await engine.tokenize(lambda e: render_chat(e, conv, req, chat_template, trust_request_template),
                                   sum(len(str(m["content"])) for m in conv))
    prompt_opened = reasoning_parser is not None and reasoning_parser.prompt_opens(engine.tokenizer.decode(prompt[-16:]))
    parsers = [ReplyParser(reasoning_parser(prompt_opened) if reasoning_parser else None,
                           make_tool_parser() if make_tool_parser else None, req.parallel_tool_calls)
               for _ in range(req.n)]
    top_n = req.top_logprobs or 0
    params = req.sampling_params(req.max_output_tokens, top_n if req.logprobs else None)
    if (schema := tool_choice_schema(req.tools, req.tool_choice, req.parallel_tool_calls)) is not None:
        if params.structured_outputs is not None:  # vLLM: either guided decoding or tools, not both
            raise ValueError("`tool_choice` 'required' or naming a function cannot be combined with "
                             "`response_format`, `structured_outputs` or `guided_*`")
        params = dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=schema))
    cid = f"chatcmpl-{req.request_id or uuid.uuid4().hex}"
    group = await engine.add_requests([cid], [prompt], params, time.monotonic(), req.cache_salt)
    head = {"id": cid, "created": int(time.time()), "model": model}
    role = req.role
    # echo (vLLM): the reply starts with the last message when that message has the reply's role
    echo = conv[-1]["content"] if req.echo and conv[-1]["role"] == role else ""
    texts, num_tokens = [""] * req.n, [0] * req.n
    finish: list[tuple[str | None, int | str | None]] = [(None, None)] * req.n
    logprobs: list[list[dict]] = [[] for _ in range(req.n)]
    prompt_logprobs = None

    def usage() -> dict:
        p, g = len(group.prompt_ids[0]), sum(num_tokens)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    if req.stream:
        head["object"] = "chat.completion.chunk"

        async def chunks() -> AsyncIterator[dict]:
            for i in range(req.n):
                yield {**head, "choices": [{"index": i, "delta": {"role": role, "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
            for i in range(req.n if echo else 0):
                yield {**head, "choices": [{"index": i, "delta": {"content": echo}, "logprobs": None,
                                            "finish_reason": None}]}
            async for out in group:
                for o in out.outputs:
                    num_tokens[o.index] += len(o.token_ids)
                    lp = _chat_logprobs(o, top_n, req.return_tokens_as_token_ids) if req.logprobs else None
                    delta = parsers[o.index].stream(o.text, o.finish_reason is not None)
                    if delta or o.finish_reason or (lp and lp["content"]):
                        reason = "tool_calls" if o.finish_reason and parsers[o.index].tools_called else o.finish_reason
                        yield {**head, "choices": [{"index": o.index, "delta": delta.to_json(), "logprobs": lp,
                                                    "finish_reason": reason, "stop_reason": o.stop_reason}]}
            if req.include_usage:
                yield {**head, "choices": [], "usage": usage()}

        return sse_response(chunks(), group)

    try:
        async for out in group:
            prompt_logprobs = out.prompt_logprobs
            for o in out.outputs:
                texts[o.index] += o.text
                num_tokens[o.index] += len(o.token_ids)
                finish[o.index] = (o.finish_reason, o.stop_reason)
                if req.logprobs:
                    logprobs[o.index] += _chat_logprobs(o, top_n, req.return_tokens_as_token_ids)["content"]
    finally:
        group.abort()
    choices = []
    for i, parser in enumerate(parsers):
        reply = parser.parse(texts[i])
        message = {"role": role, "content": echo + (reply.content or "") if echo else reply.content}
        if reasoning_parser is not None:
            message["reasoning_content"] = reply.reasoning_content
        if reply.tool_calls:
            message["tool_calls"] = [c.to_json() for c in reply.tool_calls]
        choices.append({"index": i, "message": message,
                        "logprobs": {"content": logprobs[i]} if req.logprobs else None,
                        "finish_reason": "tool_calls" if reply.tool_calls else finish[i][0],
                        "stop_reason": finish[i][1]})
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage(),
                         "prompt_logprobs": prompt_logprobs_json(prompt_logprobs)})
