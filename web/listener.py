"""`POST /optimove/events`: identify, limit, validate, persist, enqueue, answer."""
from __future__ import annotations

import hmac
import json
import logging
import re
import time

from flask import Blueprint, Flask, current_app, jsonify, request

from shared import dispatch, repository as repo
from shared.broker import publish
from shared.db import once_more_if_stale
from shared.schemas import parse_notification
from web.context import celery, runtime
from web.errors import ApiError
from web.metrics import LISTENER_LATENCY, LISTENER_RESPONSES

log = logging.getLogger(__name__)
bp = Blueprint("listener", __name__)


def token_ok(given: str | None, tokens) -> bool:
    """Constant-time check of `given` against every configured token (all compared, none short-cut)."""
    if not given or not tokens:
        return False
    given_b = given.encode()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given_b, token.get().encode())
    return ok


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# a lone UTF-16 surrogate can only arrive as a \\uD800-\\uDFFF escape (UTF-8 cannot encode one)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# \u0000 as an escape (not the text `\\u0000`, an escaped backslash followed by u0000)
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _decode(raw: bytes) -> tuple[str, str, object]:
    """UTF-8 JSON that Postgres can store as jsonb: (raw text, text for the jsonb payload, parsed body).

    NaN/Infinity and NUL characters are refused. An unpaired surrogate escape (`"\\ud8ba"`), which
    jsonb cannot hold, is kept in the raw body as received and replaced by U+FFFD in the parsed body
    and the payload, so the notification is stored rather than lost.
    """
    try:
        text = raw.decode("utf-8")
        if "\x00" in text or "\\u0000" in text and _NUL_ESCAPE.search(text):
            raise ValueError("NUL characters are not accepted")
        body = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid notification", fields={"_body": [f"not valid JSON: {exc}"]}) from None
    except RecursionError:  # e.g. 50,000 nested arrays: the parser's recursion, not a server fault
        raise ApiError(400, "invalid notification", fields={"_body": ["JSON nested too deeply"]}) from None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):  # rare, so the common path pays one `in`
        payload = json.dumps(body, ensure_ascii=False)
        if _LONE_SURROGATE.search(payload):
            payload = _LONE_SURROGATE.sub("\ufffd", payload)
            return text, payload, json.loads(payload)
    return text, text, body


def _store(connections, notification, text: str, payload: str) -> tuple[int, bool]:
    """Insert and commit (`once_more_if_stale` retries it when the kept connection was dead)."""
    with connections.autocommit() as conn:  # one statement: it commits itself
        return repo.insert_notification(conn, notification, text, payload)


@bp.post("/optimove/events")
def receive():
    """Store one Optimove notification and hand it to the workers."""
    rt = runtime()
    given = request.headers.get("X-Relay-Token") or request.args.get("token")
    if not token_ok(given, rt.settings.listener_tokens):
        raise ApiError(401, "unauthorized")
    if request.content_length is not None and request.content_length > rt.settings.max_body_bytes:
        raise ApiError(413, f"body too large (limit {rt.settings.max_body_bytes} bytes)")
    if not _is_json(request.mimetype):
        raise ApiError(415, "expected Content-Type application/json")
    text, payload, body = _decode(request.get_data(cache=True))
    hint = request.args.get("EventTypeID") or request.args.get("event_type")
    notification = parse_notification(body, hint)
    notification_id, created = once_more_if_stale(_store, current_app.extensions["listener_db"], notification,
                                                  text, payload)
    if not created:
        return jsonify({"status": "duplicate", "notification_id": notification_id}), 200
    try:
        task = dispatch.process_notification(notification_id, notification.event_type)
        direct = current_app.extensions["direct_publisher"]
        if direct is not None:
            direct.publish(task)
        else:
            publish(celery(), [task], retry=False)
    except Exception as exc:  # the row is committed; the sweeper enqueues it later
        log.warning("notification %s stored but not enqueued (%s); the sweeper will retry",
                    notification_id, type(exc).__name__)
    return jsonify({"status": "accepted", "notification_id": notification_id}), 202


def init_app(app: Flask) -> None:
    """Register the listener and its latency/outcome metrics."""
    app.register_blueprint(bp)

    @app.before_request
    def _start_timer():
        request.environ["relay.start"] = time.perf_counter()

    @app.after_request
    def _observe(response):
        if request.endpoint == "listener.receive" or request.path == "/optimove/events":
            LISTENER_LATENCY.observe(time.perf_counter() - request.environ.get("relay.start", time.perf_counter()))
            LISTENER_RESPONSES.labels(code=str(response.status_code)).inc()
        return response
