"""`POST /v1/completions`: prompts (text or token ids) in, legacy-format choices out."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse, Response

from jaxpaged.engine.outputs import CompletionOutput, Logprob, PromptLogprobs
from jaxpaged.engine.async_llm import AsyncLLM, RequestGroup
from jaxpaged.serve.protocol import CompletionRequest
from jaxpaged.serve.sse import sse_response


def safe_logprob(x: float) -> float:
    """JSON has no -inf or NaN: clamp as vLLM does."""
    return x if x > -9999.0 else -9999.0


def token_text(token_id: int, decoded: str | None, as_id: bool) -> str:
    """A logprob entry's token: its text, or vLLM's `token_id:N` with return_tokens_as_token_ids."""
    return f"token_id:{token_id}" if as_id else decoded or ""


class _Choice:
    """One choice's accumulated text, tokens and legacy logprobs."""

    def __init__(self, index: int, with_logprobs: bool):
        self.index, self.text, self.num_tokens, self.started = index, "", 0, False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.offset = 0  # text offset of the next logprob token
        self.logprobs = _empty_logprobs() if with_logprobs else None
        self.prompt_logprobs: PromptLogprobs | None = None

    def add_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob] | None],
                     token_strs: list[str], into: dict, as_ids: bool = False) -> None:
        for tid, entry, s in zip(token_ids, entries, token_strs):
            s = token_text(tid, s, as_ids)
            into["tokens"].append(s)
            into["text_offset"].append(self.offset)
            self.offset += len(s)
            if entry is None:
                into["token_logprobs"].append(None)
                into["top_logprobs"].append(None)
            else:
                into["token_logprobs"].append(safe_logprob(entry[tid].logprob))
                into["top_logprobs"].append({token_text(t, lp.decoded_token, as_ids): safe_logprob(lp.logprob)
                                             for t, lp in entry.items()})


def prompt_logprobs_json(entries: PromptLogprobs | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt position (None for the first) {token id: {logprob,
    rank, decoded_token}}, the prompt's token and the top N."""
    if entries is None:
        return None
    return [None if e is None else {tid: {"logprob": safe_logprob(lp.logprob), "rank": lp.rank,
                                          "decoded_token": lp.decoded_token} for tid, lp in e.items()}
            for e in entries]


def _empty_logprobs() -> dict:
    return {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}


async def create_completion(engine: AsyncLLM, req: CompletionRequest, model: str) -> Response:
    prompts = req.prompts()
    want_logprobs = req.logprobs is not None
    # echo + logprobs: the echoed prompt's logprobs (vLLM); max_tokens 0 with echo: the prompt only
    params = req.sampling_params(req.max_tokens, req.logprobs, prompt_logprobs=req.logprobs if req.echo else None)
    cid = f"cmpl-{req.request_id or uuid.uuid4().hex}"
    arrival = time.monotonic()
    ids = await engine.tokenize(lambda e: [e.encode(p, req.add_special_tokens) for p in prompts],
                                sum(len(p) for p in prompts))
    group = await engine.add_requests([f"{cid}-{i}" for i in range(len(prompts))], ids, params, arrival,
                                      req.cache_salt)
    try:
        echoes = await _echoes(engine, req, prompts, group) if req.echo else None
    except BaseException:
        group.abort()
        raise
    index = {rid: i for i, rid in enumerate(group.request_ids)}
    choices = [_Choice(i, want_logprobs) for i in range(len(prompts) * req.n)]
    created = int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": model}

    def apply(prompt_idx: int, out: CompletionOutput, prompt_logprobs, into: dict | None) -> dict:
        """Add one delta to its choice; returns the choice's delta in the response format."""
        c = choices[prompt_idx * req.n + out.index]
        text = out.text
        if echoes is not None and not c.started:
            echo_text, echo_ids, echo_strs = echoes[prompt_idx]
            text = echo_text + text
            if into is not None:
                entries = list(prompt_logprobs or [])[:len(echo_ids)]
                c.add_logprobs(echo_ids, entries + [None] * (len(echo_ids) - len(entries)), echo_strs, into,
                               req.return_tokens_as_token_ids)
        if into is not None and out.logprobs:
            strs = [e[t].decoded_token or "" for t, e in zip(out.token_ids, out.logprobs)]
            c.add_logprobs(out.token_ids, out.logprobs, strs, into, req.return_tokens_as_token_ids)
        c.text += text
        c.started = True
        c.prompt_logprobs = prompt_logprobs
        c.num_tokens += len(out.token_ids)
        c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        return {"index": c.index, "text": text, "logprobs": into, "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}

    def usage() -> dict:
        p = sum(len(ids) for ids in group.prompt_ids)
        g = sum(c.num_tokens for c in choices)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    if req.stream:
        async def chunks() -> AsyncIterator[dict]:
            async for out in group:
                for o in out.outputs:
                    into = _empty_logprobs() if want_logprobs else None
                    choice = apply(index[out.request_id], o, out.prompt_logprobs, into)
                    if choice["text"] or o.finish_reason or (into and into["tokens"]):
                        yield {**head, "choices": [choice]}
            if req.include_usage:
                yield {**head, "choices": [], "usage": usage()}

        return sse_response(chunks(), group)

    try:
        async for out in group:
            for o in out.outputs:
                c = choices[index[out.request_id] * req.n + o.index]
                apply(index[out.request_id], o, out.prompt_logprobs, c.logprobs)
    finally:
        group.abort()
    body = {**head, "choices": [{"index": c.index, "text": c.text, "logprobs": c.logprobs,
                                 "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                 "prompt_logprobs": prompt_logprobs_json(c.prompt_logprobs)}
                                for c in choices], "usage": usage()}
    return JSONResponse(body)


async def _echoes(engine: AsyncLLM, req: CompletionRequest, prompts: list[str | list[int]],
                  group: RequestGroup) -> list[tuple[str, list[int], list[str]]]:
    """Per prompt: its text (of the tokens left after truncate_prompt_tokens), token ids and
    token strings (for echo)."""
    def decode(e) -> list[tuple[str, list[int], list[str]]]:
        if e.tokenizer is None:
            raise ValueError("echo needs a tokenizer, and this model has none")
        return [(p if isinstance(p, str) and req.truncate_prompt_tokens is None else e.tokenizer.decode(ids), ids,
                 [e.tokenizer.decode([t]) for t in ids] if req.logprobs is not None else [])
                for p, ids in zip(prompts, group.prompt_ids)]

    return await engine.tokenize(decode, sum(len(ids) for ids in group.prompt_ids))
