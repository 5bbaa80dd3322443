"""Error answers: 422s that name the field, and the error statuses the routes document."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from .schemas import ErrorResponse


def field_error_response(field: str, message: str) -> JSONResponse:
    """422 in FastAPI's shape (``detail``: [{loc, msg, type}]), plus ``error``: one line that begins with the field
    (``items[1].image: ...``; ``body`` for the body as a whole)."""
    parts = [] if field == "body" else [int(p) if p.isdigit() else p
                                        for p in field.replace("[", ".").replace("]", "").split(".")]
    return JSONResponse(status_code=422, content={
        "detail": [{"loc": ["body", *parts], "msg": message, "type": "value_error"}],
        "error": f"{field}: {message}"})


def task_field_error(task: Any) -> JSONResponse:
    """The 422 of a task that failed on its input (``task.error`` is ``"field: message"``)."""
    field = task.error_field or "body"
    message = task.error or "invalid"
    if message.startswith(field + ": "):
        message = message[len(field) + 2:]
    return field_error_response(field, message)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "the job was cancelled"},
    413: {"model": ErrorResponse, "description": "the request body is too large"},
    422: {"description": "a field is invalid or over a limit; `error` names it"},
    429: {"model": ErrorResponse, "description": "the queue is full; retry after the Retry-After header's seconds"},
    500: {"model": ErrorResponse, "description": "the job crashed (a bug: the server's log has the traceback)"},
    503: {"model": ErrorResponse, "description": "the server is shutting down, ran out of memory for this job, or "
                                                 "its model failed to load"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "no such job (unknown, or finished long ago)"}}
