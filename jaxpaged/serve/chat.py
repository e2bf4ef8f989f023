"""`POST /v1/chat/completions`: messages through the chat template, assistant messages out."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse, Response

from jaxpaged.engine.outputs import CompletionOutput, Logprob
from jaxpaged.engine.async_llm import AsyncLLM, Tokenizing
from jaxpaged.serve.completions import safe_logprob
from jaxpaged.serve.protocol import ChatCompletionRequest
from jaxpaged.serve.sse import sse_response


def render_chat(engine: Tokenizing, messages: list[dict], chat_template: str | None,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation through the chat template (`AsyncLLM.tokenize`)."""
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer, so chat is not available")
    if chat_template is None and not getattr(tok, "chat_template", None):
        raise ValueError("this model has no chat template: start the server with --chat-template")
    text = tok.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
    return tok.encode(text, add_special_tokens=False)


def _chat_logprobs(out: CompletionOutput, top_n: int) -> dict:
    def item(lp: Logprob) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": safe_logprob(lp.logprob), "bytes": list(token.encode())}

    content = []
    for tid, entry in zip(out.token_ids, out.logprobs or []):
        top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_n),
                     key=lambda lp: lp.rank)
        content.append({**item(entry[tid]), "top_logprobs": [item(lp) for lp in top]})
    return {"content": content}


async def create_chat_completion(engine: AsyncLLM, req: ChatCompletionRequest, model: str,
                                 chat_template: str | None) -> Response:
    conv = req.conversation()
    prompt = await engine.tokenize(lambda e: render_chat(e, conv, chat_template, req.add_generation_prompt),
                                   sum(len(str(m["content"])) for m in conv))
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top_n = req.top_logprobs or 0
    params = req.sampling_params(max_tokens, top_n if req.logprobs else None)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    group = await engine.add_requests([cid], [prompt], params, time.monotonic())
    head = {"id": cid, "created": int(time.time()), "model": model}
    texts, num_tokens = [""] * req.n, [0] * req.n
    finish: list[tuple[str | None, int | str | None]] = [(None, None)] * req.n
    logprobs: list[list[dict]] = [[] for _ in range(req.n)]

    def usage() -> dict:
        p, g = len(prompt), sum(num_tokens)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    if req.stream:
        head["object"] = "chat.completion.chunk"

        async def chunks() -> AsyncIterator[dict]:
            for i in range(req.n):
                yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
            async for out in group:
                for o in out.outputs:
                    num_tokens[o.index] += len(o.token_ids)
                    lp = _chat_logprobs(o, top_n) if req.logprobs else None
                    if o.text or o.finish_reason or (lp and lp["content"]):
                        yield {**head, "choices": [{"index": o.index, "delta": {"content": o.text},
                                                    "logprobs": lp, "finish_reason": o.finish_reason,
                                                    "stop_reason": o.stop_reason}]}
            if req.include_usage:
                yield {**head, "choices": [], "usage": usage()}

        return sse_response(chunks(), group)

    try:
        async for out in group:
            for o in out.outputs:
                texts[o.index] += o.text
                num_tokens[o.index] += len(o.token_ids)
                finish[o.index] = (o.finish_reason, o.stop_reason)
                if req.logprobs:
                    logprobs[o.index] += _chat_logprobs(o, top_n)["content"]
    finally:
        group.abort()
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": logprobs[i]} if req.logprobs else None,
                "finish_reason": finish[i][0], "stop_reason": finish[i][1]} for i in range(req.n)]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage()})
