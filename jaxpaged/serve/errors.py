"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status."""
from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLargeError",
          405: "MethodNotAllowed", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error to report to the client as-is."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error body; `code` is the HTTP status, as in vLLM."""
    return {"error": {"message": message, "type": _TYPES.get(status, "InternalServerError"),
                      "param": param, "code": status}}


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)
