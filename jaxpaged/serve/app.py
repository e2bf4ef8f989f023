"""The Starlette app: routes, API-key check, OpenAI errors, disconnect -> abort."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable

import jinja2
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from jaxpaged.engine.async_llm import AsyncLLM, EngineDeadError
from jaxpaged.engine.generation_config import GenerationDefaults
from jaxpaged.serve.chat import create_chat_completion, render_chat
from jaxpaged.serve.completions import create_completion
from jaxpaged.serve.errors import APIError, error_body, error_response
from jaxpaged.serve.metrics import Metrics
from jaxpaged.serve.middleware import CORS, add_middlewares
from jaxpaged.serve.openapi import SWAGGER_UI, openapi_spec
from jaxpaged.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from jaxpaged.serve.reasoning import get_reasoning_parser
from jaxpaged.serve.reasoning.abs_reasoning_parsers import ReasoningParser
from jaxpaged.serve.tool_parsers import get_tool_parser
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.version import __version__

logger = logging.getLogger("jaxpaged.serve")
Handler = Callable[[Request], Awaitable[Response]]
CLIENT_ERRORS = (ValueError, TypeError, OverflowError, jinja2.TemplateError)


@dataclasses.dataclass
class ServerState:
    engine: AsyncLLM
    model_name: str  # the first served name, echoed in responses
    served_names: tuple[str, ...]
    model_path: str
    chat_template: str | None = None
    api_key: str | None = None
    trust_request_chat_template: bool = False
    tool_parser: type[ToolParser] | None = None  # for tool_choice "auto"
    reasoning_parser: type[ReasoningParser] | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def build_app(engine: AsyncLLM, served_names: list[str] | tuple[str, ...], model_path: str,
              chat_template: str | None = None, api_key: str | None = None,
              max_request_body_size: int | None = None, cors: CORS | None = None,
              generation_defaults: GenerationDefaults | None = None, log_requests: bool = False,
              max_log_len: int | None = None, docs: bool = True,
              trust_request_chat_template: bool = False, tool_parser: str | None = None,
              reasoning_parser: str | None = None, return_tokens_as_token_ids: bool = False) -> Starlette:
    """The OpenAI-compatible app over an engine client; on shutdown it closes the client (which
    stops the engine core if the client started it). Bodies over `max_request_body_size`
    bytes get 413 (None: no limit); `cors`: vLLM's CORS settings (its defaults allow all);
    `generation_defaults`: for the sampling fields a request leaves unset; `log_requests`: log
    each generation request (its fields, each cut to `max_log_len` characters) at INFO;
    `docs`: serve /openapi.json and /docs; `trust_request_chat_template`: a request's own
    `chat_template` is used, not refused; `tool_parser`: the --tool-call-parser of tool_choice
    "auto" (vLLM's --enable-auto-tool-choice); `reasoning_parser`: --reasoning-parser's name;
    `return_tokens_as_token_ids`: logprob tokens as `token_id:N` where a request does not say."""
    state = ServerState(engine, served_names[0], tuple(served_names), model_path, chat_template, api_key,
                        trust_request_chat_template, tool_parser and get_tool_parser(tool_parser),
                        reasoning_parser and get_reasoning_parser(reasoning_parser))
    defaults = generation_defaults or GenerationDefaults()
    if defaults.max_tokens is not None:
        engine.processor.default_max_tokens = defaults.max_tokens
    metrics = Metrics(state.model_name, lambda: engine.stats)
    engine.observer = metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    def parse_model(model: str | None) -> None:
        if model is not None and model not in state.served_names:
            raise APIError(f"The model `{model}` does not exist.", 404, "model")

    def generation_request(request: Request, req: CompletionRequest | ChatCompletionRequest) -> None:
        parse_model(req.model)
        req.apply_defaults(defaults)
        if (header := request.headers.get("X-Request-Id")) is not None:  # vLLM: the header before the field
            req.request_id = header
        if req.return_tokens_as_token_ids is None:
            req.return_tokens_as_token_ids = return_tokens_as_token_ids
        if log_requests:
            fields = {k: _cut(v, max_log_len) for k, v in req.model_dump(exclude_unset=True).items()}
            logger.info("request %s from %s: %s", request.url.path, request.client and request.client.host, fields)

    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        generation_request(request, req)
        return await create_completion(engine, req, state.model_name)

    async def chat(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        generation_request(request, req)
        return await create_chat_completion(engine, req, state.model_name, state.chat_template,
                                            state.trust_request_chat_template, state.tool_parser,
                                            state.reasoning_parser)

    async def models(request: Request) -> Response:
        max_len = engine.max_model_len
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "jaxpaged",
             "root": state.model_path, "parent": None, "max_model_len": max_len, "permission": [],
             "quantization": engine.info.quantization, "kv_cache_dtype": engine.info.kv_cache_dtype}
            for name in state.served_names]})

    async def tokenize(request: Request) -> Response:
        req = await parse(request, TokenizeRequest)
        parse_model(req.model)

        def run(e) -> dict:
            if e.tokenizer is None:
                raise ValueError("this model has no tokenizer")
            if req.messages is not None:
                conv = [m.template_message() for m in req.messages]
                ids = render_chat(e, conv, req, state.chat_template, state.trust_request_chat_template)
            else:
                ids = e.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            out = {"count": len(ids), "max_model_len": e.max_model_len, "tokens": ids}
            if req.return_token_strs:
                out["token_strs"] = e.tokenizer.convert_ids_to_tokens(ids)
            return out

        size = len(req.prompt or "") + sum(len(m.text()) for m in req.messages or [])
        return JSONResponse(await engine.tokenize(run, size))

    async def detokenize(request: Request) -> Response:
        req = await parse(request, DetokenizeRequest)
        parse_model(req.model)

        def run(e) -> dict:
            vocab = e.info.vocab_size
            if e.tokenizer is None:
                raise ValueError("this model has no tokenizer")
            if any(not 0 <= t < vocab for t in req.tokens):
                raise APIError(f"token ids must be in [0, {vocab})", 400, "tokens")
            return {"prompt": e.tokenizer.decode(req.tokens)}

        return JSONResponse(await engine.tokenize(run, len(req.tokens)))

    async def health(request: Request) -> Response:
        return Response(status_code=200 if engine.alive else 503)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/v1/completions", api(completions, cancel_on_disconnect=True), methods=["POST"]),
        Route("/v1/chat/completions", api(chat, cancel_on_disconnect=True), methods=["POST"]),
        Route("/v1/models", api(models), methods=["GET"]),
        Route("/tokenize", api(tokenize), methods=["POST"]),
        Route("/detokenize", api(detokenize), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET", "POST"]),  # vLLM's (SageMaker's) health check
        Route("/version", version, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    if docs:
        spec = openapi_spec(__version__, api_key=bool(api_key))
        routes += [Route("/openapi.json", lambda request: JSONResponse(spec), methods=["GET"]),
                   Route("/docs", lambda request: HTMLResponse(SWAGGER_UI), methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    add_middlewares(app, api_key, max_request_body_size, cors)
    return app


def _cut(value: object, max_len: int | None) -> object:
    """A logged field: its text cut to `max_len` characters (None: whole)."""
    text = value if isinstance(value, str) else repr(value)
    return value if max_len is None or len(text) <= max_len else text[:max_len] + "..."


async def parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body validated as `model`; any problem is a 400 naming the field."""
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError) as e:
        raise APIError(f"malformed JSON body: {e}", 400) from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object", 400)
    return model.model_validate(data)


def api(handler: Handler, cancel_on_disconnect: bool = False) -> Handler:
    """Map errors to OpenAI's body (client input: 400) and, if asked, stop on disconnect."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            if cancel_on_disconnect:
                return await _cancel_on_disconnect(handler, request)
            return await handler(request)
        except APIError as e:
            return error_response(e.message, e.status, e.param)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            return error_response(f"{param}: {err['msg']}" if param else err["msg"], 400, param)
        except EngineDeadError as e:
            return error_response(str(e), 503)
        except CLIENT_ERRORS as e:
            return error_response(str(e), 400)

    return wrapped


async def _cancel_on_disconnect(handler: Handler, request: Request) -> Response:
    """Run the handler, cancelling it (its `finally` aborts the engine requests) if the client goes."""
    await request.body()  # read first: after it, `receive` only reports the disconnect

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(handler(request))
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)  # let its `finally` run
    if work.cancelled():
        logger.info("client disconnected: request %s cancelled", request.url.path)
        return Response(status_code=499)
    return work.result()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse(error_body(exc.detail, exc.status_code), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("internal error on %s", request.url.path, exc_info=exc)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", 500), status_code=500)
