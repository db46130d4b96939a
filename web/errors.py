"""The one place that maps errors to HTTP answers (always JSON)."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from shared.db import DatabaseUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An expected refusal with an HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def error(status: int, message: str, **extra):
    """A JSON error response."""
    response = jsonify({"status": "error", "error": message, **extra})
    response.status_code = status
    return response


def init_app(app: Flask) -> None:
    """Register the error handlers."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error(exc.status, exc.message, **exc.extra)

    @app.errorhandler(ValidationError)
    def _invalid(exc: ValidationError):
        return error(400, "invalid notification", fields=exc.normalized_messages())

    @app.errorhandler(DatabaseUnavailable)
    def _db_down(exc: DatabaseUnavailable):
        log.error("database unavailable: %s", exc)
        return error(503, "database unavailable; nothing was stored, please retry")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        messages = {413: "body too large", 405: "method not allowed", 404: "not found"}
        response = error(exc.code or 500, messages.get(exc.code, exc.description or exc.name))
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response
