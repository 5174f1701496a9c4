"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, with vLLM's statuses and types;
under /api/ (the Ollama API), Ollama's `{"error": "message"}` with the same status.

`type` is the HTTP status phrase as one word plus "Error" (BadRequestError, NotFoundError, ...) and
`code` the status as an int, as vLLM sends them.
"""
from __future__ import annotations

import json
import logging
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error to send to the client as is."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, param: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.error_type = error_type or error_type_for(self.status)
        self.headers = headers

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.error_type)

    def to_response(self, request: Request | None = None) -> JSONResponse:
        """OpenAI's shape; Ollama's (`{"error": "message"}`) for a request to the Ollama API."""
        body = {"error": self.message} if request is not None and is_ollama_path(request) else self.to_dict()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def is_ollama_path(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_type_for(status: int) -> str:
    phrase = "".join(HTTPStatus(status).phrase.split()) if status in HTTPStatus._value2member_map_ else "Unknown"
    return phrase if phrase.endswith("Error") else phrase + "Error"


def error_body(message: str, status: int, param: str | None = None, error_type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type or error_type_for(status), "param": param,
                      "code": status}}


def sse_error(error: BaseException) -> str:
    """The event a stream sends when it fails after it started."""
    api_error = error if isinstance(error, APIError) else from_exception(error)
    return f"data: {json.dumps(api_error.to_dict(), ensure_ascii=False)}\n\n"


def from_exception(error: BaseException) -> APIError:
    """APIError for anything raised while serving a request: ValueError is the client's fault (400).

    A fault of ours is a 500 whose message names no exception, file or path: those go to the log.
    """
    from pagedserve.engine.async_engine import EngineDeadError, EngineOverloadedError, RequestFailedError

    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineOverloadedError):
        return APIError(str(error), HTTPStatus.SERVICE_UNAVAILABLE, headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, EngineDeadError):
        return APIError(str(error), HTTPStatus.SERVICE_UNAVAILABLE)
    if isinstance(error, RequestFailedError):   # the engine logged the cause
        return APIError(f"{error}; the server log has the details", HTTPStatus.INTERNAL_SERVER_ERROR)
    if isinstance(error, ValueError):
        return APIError(str(error), HTTPStatus.BAD_REQUEST, getattr(error, "param", None))
    logger.exception("request failed", exc_info=error)
    return APIError("internal server error; the server log has the details", HTTPStatus.INTERNAL_SERVER_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # NOTE: handlers for these classes answer and are done; the one for Exception also re-raises
    # (Starlette's ServerErrorMiddleware), so uvicorn logs a second traceback. RuntimeError covers
    # EngineDeadError (503) without importing the engine (and torch) before the server listens.
    app.add_exception_handler(ValueError, _known_error)
    app.add_exception_handler(RuntimeError, _known_error)
    app.add_exception_handler(Exception, _known_error)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) from pydantic's error list, naming the first bad field."""
    messages, param = [], None
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        if param is None and location:
            param = location[0]
        where = ".".join(location)
        messages.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(messages) or "invalid request", param


def _logged(request: Request, error: APIError) -> JSONResponse:
    """The error's response, after one log line with its reason and the request's id (the client's
    X-Request-Id, else a new one, sent back in that header)."""
    request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex[:16]}"
    level = logging.WARNING if error.status >= HTTPStatus.INTERNAL_SERVER_ERROR else logging.INFO
    logger.log(level, "Request %s (%s %s) answered %d: %s", request_id, request.method, request.url.path,
               error.status, error.message)
    response = error.to_response(request)
    response.headers["X-Request-Id"] = request_id
    return response


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return _logged(request, error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(error.errors()))
    return _logged(request, APIError(message, HTTPStatus.BAD_REQUEST, param))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    api_error = APIError(str(error.detail), error.status_code, headers=getattr(error, "headers", None))
    return _logged(request, api_error)


async def _known_error(request: Request, error: Exception) -> JSONResponse:
    return _logged(request, from_exception(error))
