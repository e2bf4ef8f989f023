"""/openapi.json (OpenAPI 3.1) from the pydantic request models of serve/protocol.py, and /docs
(Swagger UI, loaded from a CDN, as FastAPI serves it)."""
from __future__ import annotations

import dataclasses

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from jaxpaged.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

SCHEMAS = "#/components/schemas/"
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}}
ERRORS = {400: "Bad request (the message names the field)", 401: "Missing or wrong API key",
          404: "Unknown model", 413: "Request body over --max-request-body-size",
          503: "The engine core is not alive (or the server is shutting down)"}
GENERATE_ERRORS = (400, 401, 404, 413, 503)


@dataclasses.dataclass(frozen=True)
class Operation:
    """One route and method as the spec describes it."""
    path: str
    method: str
    summary: str
    body: type[BaseModel] | None = None
    media: str = "application/json"  # of the 200 response
    errors: tuple[int, ...] = ()
    stream: bool = False  # may answer text/event-stream (`"stream": true`)


OPERATIONS = (
    Operation("/v1/completions", "post", "Completions (OpenAI legacy)", CompletionRequest,
              errors=GENERATE_ERRORS, stream=True),
    Operation("/v1/chat/completions", "post", "Chat completions", ChatCompletionRequest,
              errors=GENERATE_ERRORS, stream=True),
    Operation("/v1/models", "get", "The served model names", errors=(401,)),
    Operation("/tokenize", "post", "Text or messages to token ids", TokenizeRequest, errors=(400, 404, 413, 503)),
    Operation("/detokenize", "post", "Token ids to text", DetokenizeRequest, errors=(400, 404, 413, 503)),
    Operation("/health", "get", "200 while the engine core is alive, else 503", media="", errors=(503,)),
    Operation("/ping", "get", "As /health (SageMaker's)", media="", errors=(503,)),
    Operation("/ping", "post", "As /health (SageMaker's)", media="", errors=(503,)),
    Operation("/version", "get", "The jaxpaged version"),
    Operation("/metrics", "get", "Prometheus metrics under vLLM's names", media="text/plain"),
)


def openapi_spec(version: str, api_key: bool = False) -> dict:
    """The spec of the app's routes; with `api_key`, /v1 routes need the bearer key."""
    bodies = sorted({op.body for op in OPERATIONS if op.body is not None}, key=lambda m: m.__name__)
    _, top = models_json_schema([(m, "validation") for m in bodies], ref_template=SCHEMAS + "{model}")
    components: dict = {"schemas": {**top["$defs"], "ErrorResponse": ERROR_SCHEMA}}
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    paths: dict = {}
    for op in OPERATIONS:
        ok: dict = {"description": "OK"}
        if op.media:
            ok["content"] = {op.media: {"schema": {"type": "object"} if op.media.endswith("json") else
                                        {"type": "string"}}}
        if op.stream:
            ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        responses = {"200": ok} | {str(s): _error(s) for s in op.errors}
        entry: dict = {"summary": op.summary, "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_')}",
                       "responses": responses}
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": SCHEMAS + op.body.__name__}}}}
        if api_key and op.path.startswith("/v1"):
            entry["security"] = [{"bearer": []}]
        paths.setdefault(op.path, {})[op.method] = entry
    return {"openapi": "3.1.0", "info": {"title": "jaxpaged OpenAI-compatible API", "version": version},
            "paths": paths, "components": components}


def _error(status: int) -> dict:
    return {"description": ERRORS[status],
            "content": {"application/json": {"schema": {"$ref": SCHEMAS + "ErrorResponse"}}}}


SWAGGER_UI = """<!DOCTYPE html>
<html><head><title>jaxpaged - Swagger UI</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "./openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""
