"""`GET /openapi.json`: the OpenAPI 3.0 document of the listener and the `/api/` endpoints.

The document is built here, by hand, next to the code it describes; `tests/integration/test_openapi.py`
validates it and runs schemathesis against the app, so a response that contradicts it fails a test.
"""
from __future__ import annotations

from flask import Blueprint, Flask, jsonify

from shared.repository import ANY_LEDGER_STATUS, LEDGER_TABLES, NOTIFICATION_STATUSES, RUN_STATUSES
from shared.schemas import BIGINT_MAX, REQUIRED, SUPPORTED_EVENT_TYPES
from shared.views import LIMIT_DEFAULT, LIMIT_MAX
from web.query import OFFSET_MAX

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
# an id: a whole number (also written 1359.0 or 1.359e3) or a numeric string
_OPT_ID = {"oneOf": [{"type": "number", "multipleOf": 1, "minimum": 0, "maximum": BIGINT_MAX},
                     {"type": "string", "pattern": "^[0-9]{1,18}$"}]}
_FIELDS = {
    "TimeStamp": _OPT_TIME,
    "CampaignID": _OPT_ID,
    "ChannelID": _OPT_ID,
    "ClearanceRequiredBy": _OPT_TIME,
    "CustomerID": {"oneOf": [{"type": "string", "pattern": "\\S"}, {"type": "integer"}],
                   "description": "a customer id (real-time events); a number is read as its text"},
    "TemplateID": _OPT_ID,
    "PromoCode": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
                      "nullable": True, "oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}}],
                  "description": "a comma-separated string or a list of codes (nulls skipped, numbers as text)"},
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
# every query parameter is optional, and an empty value (`?status=`) counts as not given;
# a parameter an operation does not list is refused with 400
_LIMIT = {"name": "limit", "in": "query", "required": False, "allowEmptyValue": True, "schema": {"type": "integer"},
          "description": f"how many, newest first (default {LIMIT_DEFAULT}; any integer, clamped to 1..{LIMIT_MAX})"}


def _choice(name: str, allowed, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "allowEmptyValue": True, "description": description,
            "schema": {"type": "string", "enum": list(allowed)}}


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
            "/api/overview": {"get": {
                "operationId": "overview",
                "summary": "What /admin shows: newest notifications and runs, conditional runs, rate-limit waits, errors",
                "security": _BASIC, "parameters": [_LIMIT],
                "responses": {"200": _json("Overview", "the overview"), **_errors(400, 401, 503)},
            }},
            "/api/campaigns": {"get": {
                "operationId": "recentRuns", "summary": "The newest runs of every flow", "security": _BASIC,
                "parameters": [_LIMIT, _choice("status", RUN_STATUSES, "only runs in this status")],
                "responses": {"200": _json({"type": "object", "required": ["limit", "runs"], "properties": {
                    "limit": _INT, "status": _NSTR,
                    "runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}}}}, "newest first"),
                    **_errors(400, 401, 503)},
            }},
            "/api/campaigns/{campaign_id}/ledger": {"get": {
                "operationId": "campaignLedger",
                "summary": "A page of a campaign's ledger rows, newest first",
                "security": _BASIC,
                "parameters": [
                    {"name": "campaign_id", "in": "path", "required": True, "schema": _ID},
                    _choice("ledger", tuple(t.name for t in LEDGER_TABLES), "which ledger (default grants)"),
                    _choice("status", ANY_LEDGER_STATUS, "only rows in this status"),
                    _LIMIT,
                    {"name": "offset", "in": "query", "required": False, "allowEmptyValue": True,
                     "schema": {"type": "integer", "minimum": 0, "maximum": OFFSET_MAX}},
                    {"name": "before", "in": "query", "required": False, "allowEmptyValue": True, "schema": _ID,
                     "description": "keyset paging: rows with a smaller id (see `next_before`)"},
                ],
                "responses": {"200": _json("LedgerPage", "the page"),
                              **_errors(400, 401, 503),
                              "404": _json("Error", "the relay knows nothing of this campaign")},
            }},
            "/api/notifications": {"get": {
                "operationId": "recentNotifications", "summary": "The newest notifications, without bodies",
                "security": _BASIC,
                "parameters": [
                    _choice("status", NOTIFICATION_STATUSES, "only notifications in this status"),
                    {"name": "event", "in": "query", "required": False, "allowEmptyValue": True,
                     "schema": {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1}},
                    {"name": "campaign", "in": "query", "required": False, "allowEmptyValue": True, "schema": _ID},
                    _LIMIT,
                ],
                "responses": {"200": _json({"type": "object", "required": ["limit", "notifications"], "properties": {
                    "limit": _INT, "status": _NSTR, "event_type": _NINT, "campaign_id": _NINT,
                    "notifications": {"type": "array", "items": {"$ref": "#/components/schemas/NotificationSummary"}},
                }}, "newest first"), **_errors(400, 401, 503)},
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
                "operationId": "readyz", "summary": "Postgres, Redis and the broker (when not that Redis) reachable",
                "security": [],
                "responses": {"200": _json("Readiness", "all reachable"),
                              "503": _json("Readiness", "one or more unreachable (`error` names which)")},
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
                "NotificationSummary": {"type": "object", "required": ["id", "event_type", "status"],
                                        "additionalProperties": True, "properties": {
                                            "id": _INT, "event_type": _INT, "campaign_id": _NINT,
                                            "channel_id": _NINT, "status": _STR, "attempts": _INT,
                                            "last_error": _NSTR, "received_at": _TIME}},
                "Overview": {"type": "object", "additionalProperties": True,
                             "required": ["notifications", "runs", "conditional_runs", "rate_limit", "errors"],
                             "properties": {
                                 "generated_at": _TIME, "limit": _INT,
                                 "notifications": {"type": "array",
                                                   "items": {"$ref": "#/components/schemas/NotificationSummary"}},
                                 "runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
                                 "conditional_runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
                                 "rate_limit": {"type": "object", "additionalProperties": True,
                                                "description": "waits of every worker for the shared Optimove limit"},
                                 "errors": {"type": "object", "additionalProperties": True, "properties": {
                                     "runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
                                     "notifications": {"type": "array", "items": {
                                         "$ref": "#/components/schemas/NotificationSummary"}}}}}},
                "LedgerPage": {"type": "object", "additionalProperties": True,
                               "required": ["campaign_id", "ledger", "limit", "rows", "has_more"],
                               "properties": {
                                   "campaign_id": _INT, "ledger": _STR, "status": _NSTR, "limit": _INT,
                                   "offset": _INT, "before": _NINT, "has_more": {"type": "boolean"},
                                   "next_before": _NINT,
                                   "rows": {"type": "array", "items": {
                                       "type": "object", "required": ["id", "status"], "additionalProperties": True,
                                       "properties": {"id": _INT, "status": _STR, "customer_id": _STR,
                                                      "attempts": _INT, "reason": _NSTR}}}}},
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
