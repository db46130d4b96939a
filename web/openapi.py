"""`GET /openapi.json`: the OpenAPI 3.0 document of the listener and the `/api/` endpoints.

The document is built here, by hand, next to the code it describes; `tests/integration/test_openapi.py`
validates it and runs schemathesis against the app, so a response that contradicts it fails a test.
"""
from __future__ import annotations

from flask import Blueprint, Flask, jsonify

from shared.schemas import BIGINT_MAX, REQUIRED, SUPPORTED_EVENT_TYPES

bp = Blueprint("openapi", __name__)

_ERROR = {
    "type": "object",
    "required": ["status", "error"],
    "properties": {
        "status": {"type": "string", "enum": ["error"]},
        "error": {"type": "string", "description": "what was wrong, for a person to read"},
        "fields": {"type": "object", "description": "per-field messages of a refused notification",
                   "additionalProperties": True},
    },
    "additionalProperties": True,
}

_NOTIFICATION_ANSWER = {
    "type": "object",
    "required": ["status", "notification_id"],
    "properties": {
        "status": {"type": "string", "enum": ["accepted", "duplicate"]},
        "notification_id": {"type": "integer", "minimum": 1},
    },
}

# Optimove's notification bodies (optimove-protocol.md §4). The document gives the canonical spelling of
# each event type's body; the listener is more tolerant than this (keys in any casing, `?EventTypeID=`
# for a body that lacks it, timestamps with an offset), and unknown keys are stored as they came.
_TIME_PATTERN = ("^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8]) "
                 "([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$")
_OPT_TIME = {"type": "string", "pattern": _TIME_PATTERN, "example": "2026-11-27 05:04:54",
             "description": "YYYY-MM-DD HH:MM[:SS], in Optimove's time zone (OPTIMOVE_TIMEZONE)"}
_OPT_ID = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": BIGINT_MAX},
                     {"type": "string", "pattern": "^[0-9]{1,18}$"}]}
_FIELDS = {
    "TimeStamp": _OPT_TIME,
    "CampaignID": _OPT_ID,
    "ChannelID": _OPT_ID,
    "ClearanceRequiredBy": _OPT_TIME,
    "CustomerID": {"type": "string", "pattern": "\\S", "description": "a customer id (real-time events)"},
    "TemplateID": _OPT_ID,
    "PromoCode": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                  "description": "a list of codes or a comma-separated string"},
}


def _event_body(event_type: int) -> dict:
    # a null is read as absent, so an optional field may be null and a required one may not
    optional = {name: {**schema, "nullable": True} for name, schema in _FIELDS.items()
                if name not in REQUIRED[event_type]}
    required = ["EventTypeID", *REQUIRED[event_type]]
    return {"type": "object", "title": f"EventTypeID {event_type}", "required": required,
            "properties": {"EventTypeID": {"oneOf": [{"type": "integer", "enum": [event_type]},
                                                     {"type": "string", "enum": [str(event_type)]}]},
                           **_FIELDS, **optional},
            "additionalProperties": True}


def _notification() -> dict:
    return {"description": ("One Optimove notification; the fields each event type needs are required. "
                            "Ids may be numbers or numeric strings."),
            "oneOf": [_event_body(t) for t in SUPPORTED_EVENT_TYPES]}


def _json(schema: dict | str, description: str) -> dict:
    ref = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _errors(*codes: int) -> dict:
    text = {400: "a parameter is not valid (the message names it)", 401: "missing or wrong credentials",
            404: "no such resource", 405: "method not allowed", 413: "body too large",
            415: "Content-Type is not JSON", 503: "Postgres or Redis unavailable; nothing was changed"}
    return {str(code): _json("Error", text[code]) for code in codes}


_BASIC = [{"basicAuth": []}]
_ID = {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX}


def document() -> dict:
    """The OpenAPI document (a fresh dict each call)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Optimove Relay",
            "version": "1",
            "description": ("Receives Optimove event notifications and shows what the relay did with them. "
                            "The listener takes a token (`?token=` or `X-Relay-Token`); `/api/` takes basic auth "
                            "(RELAY_ADMIN_USER / RELAY_ADMIN_PASSWORD)."),
        },
        "paths": {
            "/optimove/events": {"post": {
                "operationId": "receiveNotification",
                "summary": "Store one Optimove notification and hand it to the workers",
                "description": ("Answers at once: 202 when stored and queued, 200 when the same notification was "
                                "already stored (nothing is queued twice). A refused request changes nothing. A body with a NUL "
                                "character (`\\u0000`) is refused with 400: Postgres cannot store it."),
                "security": [{"tokenQuery": []}, {"tokenHeader": []}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Notification"}}}},
                "responses": {
                    "200": _json("NotificationAnswer", "already stored: `status` is `duplicate`"),
                    "202": _json("NotificationAnswer", "stored and queued: `status` is `accepted`"),
                    **_errors(400, 401, 405, 413, 415, 503),
                },
            }},
            "/api/campaigns/{campaign_id}": {"get": {
                "operationId": "campaignStatus",
                "summary": "A campaign's runs with their counts, its ledgers by status, and an overall status",
                "security": _BASIC,
                "parameters": [{"name": "campaign_id", "in": "path", "required": True, "schema": _ID}],
                "responses": {"200": _json("CampaignStatus", "the campaign (`status: unknown` when the relay "
                                                             "has no run or ledger row for it)"),
                              **_errors(401, 404)},
            }},
            "/api/notifications/{notification_id}": {"get": {
                "operationId": "notification",
                "summary": "One stored notification: event type, ids, status, attempts, last error, times",
                "security": _BASIC,
                "parameters": [{"name": "notification_id", "in": "path", "required": True, "schema": _ID}],
                "responses": {"200": _json("NotificationRow", "the notification"), **_errors(401, 404)},
            }},
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "The process answers", "security": [],
                "responses": {"200": _json({"type": "object", "required": ["status"],
                                            "properties": {"status": {"type": "string", "enum": ["ok"]}}},
                                           "up")},
            }},
            "/readyz": {"get": {
                "operationId": "readyz", "summary": "Postgres and Redis reachable", "security": [],
                "responses": {"200": _json("Readiness", "both reachable"),
                              "503": _json("Readiness", "one or both unreachable (`error` names which)")},
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document", "security": [],
                "responses": {"200": {"description": "the OpenAPI document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}},
            }},
        },
        "components": {
            "securitySchemes": {
                "tokenQuery": {"type": "apiKey", "in": "query", "name": "token",
                               "description": "one of LISTENER_TOKENS"},
                "tokenHeader": {"type": "apiKey", "in": "header", "name": "X-Relay-Token",
                                "description": "one of LISTENER_TOKENS"},
                "basicAuth": {"type": "http", "scheme": "basic",
                              "description": "RELAY_ADMIN_USER / RELAY_ADMIN_PASSWORD"},
            },
            "schemas": {
                "Error": _ERROR,
                "Notification": _notification(),
                "NotificationAnswer": _NOTIFICATION_ANSWER,
                "Readiness": {"type": "object", "required": ["status", "checks"], "properties": {
                    "status": {"type": "string", "enum": ["ready", "unavailable"]},
                    "checks": {"type": "object", "additionalProperties": {"type": "string"}},
                    "error": {"type": "string"}}},
                "NotificationRow": _notification_row(),
                "Run": _run(),
                "CampaignStatus": _campaign_status(),
            },
        },
    }


_INT = {"type": "integer"}
_NINT = {"type": "integer", "nullable": True}
_STR = {"type": "string"}
_NSTR = {"type": "string", "nullable": True}
_TIME = {"type": "string", "format": "date-time"}
_NTIME = {"type": "string", "format": "date-time", "nullable": True}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"},
           "description": "rows by status (claimed, waiting, granted or sent, rejected, failed, ...)"}


def _notification_row() -> dict:
    return {"type": "object", "required": ["id", "event_type", "status", "attempts", "received_at"],
            "additionalProperties": True, "properties": {
                "id": _INT, "event_type": _INT, "campaign_id": _NINT, "channel_id": _NINT, "status": _STR,
                "attempts": _INT, "last_error": _NSTR, "dedupe_key": _STR,
                "payload": {"type": "object", "additionalProperties": True},
                "received_at": _TIME, "updated_at": _NTIME, "processed_at": _NTIME}}


def _run() -> dict:
    counts = ("fetched", "claimed", "duplicates_skipped", "granted", "sent", "rejected", "failed", "waiting",
              "attempts", "pages_fetched")
    return {"type": "object", "required": ["run_id", "flow", "status", *counts], "additionalProperties": True,
            "properties": {
                "run_id": _INT, "notification_id": _NINT, "flow": _STR, "channel_id": _NINT,
                "status": {"type": "string", "enum": ["running", "done", "failed", "deadline_missed", "cancelled"]},
                "cursor": _NINT, "fetch_done": {"type": "boolean"}, **{k: _INT for k in counts},
                "last_error": _NSTR, "created_at": _TIME, "finished_at": _NTIME, "seconds": {"type": "number"},
                "metrics_reported_at": _NTIME, "metrics_error": _NSTR, "deadline": _NTIME,
                "reported_true": _NINT, "reported_false": _NINT, "expired": _NINT, "revoked": _NINT,
                "cancelled": _NINT}}


def _campaign_status() -> dict:
    return {"type": "object", "required": ["campaign_id", "status", "runs", "totals", "ledger", "ledgers"],
            "additionalProperties": True, "properties": {
                "campaign_id": _INT,
                "status": {"type": "string",
                           "enum": ["unknown", "running", "done", "failed", "deadline_missed", "cancelled"]},
                "runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
                "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
                "ledger": _COUNTS,
                "ledgers": {"type": "object", "additionalProperties": _COUNTS}}}


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document (no auth: it holds no secrets)."""
    return jsonify(document())


def init_app(app: Flask) -> None:
    """Register `/openapi.json`."""
    app.register_blueprint(bp)
