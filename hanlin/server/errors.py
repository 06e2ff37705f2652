"""OpenAI-shaped errors: every failure answers {"error": {"message", "type", "param", "code"}}.

That includes FastAPI's own validation errors, malformed JSON, unknown routes (404) and wrong methods (405).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("hanlin.server")

_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "server_error",
}


class APIError(Exception):
    """An error answered to the client as OpenAI does; raise it anywhere in a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def validation_error(error: ValidationError | RequestValidationError, *, strip_body: bool = False) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (`messages[0].content`, `temperature`)."""
    details = error.errors()
    if not details:
        return bad_request("invalid request body")
    first = details[0]
    loc = list(first.get("loc", ()))
    if strip_body and loc[:1] == ["body"]:
        loc = loc[1:]
    param = _param_path(loc)
    kind = first.get("type", "")
    message = str(first.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {message}", code="invalid_json")
    if kind.endswith("_type") or kind in {"model_type", "model_attributes_type", "union_tag_invalid", "literal_error"}:
        return APIError(400, f"Invalid type for '{param}': {message}.", param=param, code="invalid_type")
    return APIError(400, f"Invalid value for '{param}': {message}.", param=param, code="invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def _param_path(loc: list[Any]) -> str:
    """('messages', 0, 'content') → messages[0].content; pydantic's union branch tags are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part or part.startswith("tagged")):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error, strip_body=True).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        status = error.status_code
        if status == 404:
            message, code = f"Unknown request URL: {request.method} {request.url.path}. Please check the URL.", "not_found"
        elif status == 405:
            message, code = f"Method {request.method} is not allowed for {request.url.path}.", "method_not_allowed"
        else:
            message, code = str(error.detail), None
        return APIError(status, message, code=code, headers=error.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(error).__name__}: {error}", code="internal_error").response()
