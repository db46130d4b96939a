"""Fake Optimove API: the functions the relay calls, with API key, rate limit and paging.

Paths are ``/{category}/{Function}`` (no ``/current`` prefix); the category matches
case-insensitively, the function name exactly. Admin endpoints live under ``/_sim/``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any, Callable

from flask import Blueprint, Flask, Response, jsonify, request

from simulator import campaigns
from simulator.campaigns import SpecError
from simulator.limiter import SlidingWindowLimiter

MAX_PAGE = 10_000
MAX_PROMOTIONS = 100
MAX_TEMPLATES = 100
MAX_PROMOS_UPDATED = 10_000
TOO_MANY_REQUESTS = {
    "status": 429,
    "error": "Too Many Requests",
    "message": "You have exceeded the rate limit for this API group. Please retry later.",
}
CHANNEL_NAMES = {502: "Call Center", 504: "Email", 505: "SMS", 506: "Push", 510: "Web Push", 511: "In-Platform"}


class BadRequest(Exception):
    """A call the real API would answer with 400; the message becomes the bare JSON string body."""


def _bare(message: str, status: int) -> Response:
    response = jsonify(message)
    response.status_code = status
    return response


def _int_param(name: str, default: int | None = None, minimum: int = 0) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"The value '{raw}' is not valid for {name}.") from None
    if value < minimum:
        raise BadRequest(f"{name} must be at least {minimum}.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class OptimoveState:
    """Everything the fake API remembers; every public method is called under ``lock``."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float]):
        self.lock = threading.Lock()
        self.limiter = SlidingWindowLimiter(limit, window, clock)
        self.random = random.Random()
        self.reset()

    def reset(self) -> None:
        """Clear statistics, campaigns, stored writes and faults."""
        self.limiter.reset()
        self.faults = {}
        self.throttled = 0
        self.injected_errors = 0
        self.by_function: dict[str, int] = {}
        self.campaigns: dict[int, dict] = {}
        self.promotions: dict[str, str] = {}
        self.channel_templates: dict[int, dict[int, str]] = {}
        self.listeners: dict[tuple, dict] = {}
        self.promotion_status: dict[int, dict] = {}
        self.campaign_metrics: list[list[dict]] = []
        self._since_burst = 0
        self._burst_left = 0

    def set_faults(self, faults: Any) -> None:
        """Validate and install fault settings; ``{}`` clears them."""
        if not isinstance(faults, dict) or set(faults) - {"burst_429", "error_rate", "seed"}:
            raise BadRequest("faults must be an object with burst_429, error_rate and/or seed")
        burst = faults.get("burst_429")
        if burst is not None and not (
                isinstance(burst, dict) and _is_int(burst.get("every")) and burst["every"] > 0
                and _is_int(burst.get("length")) and burst["length"] >= 0):
            raise BadRequest("burst_429 must be {\"every\": N > 0, \"length\": M >= 0}")
        rate = faults.get("error_rate", 0.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise BadRequest("error_rate must be a number in [0, 1]")
        self.faults = dict(faults)
        self.random = random.Random(faults.get("seed"))
        self._since_burst = self._burst_left = 0

    def admit(self, key: str, function: str) -> bool:
        """Apply injected bursts and the sliding window; True if the call is accepted."""
        if self._burst_left > 0:
            self._burst_left -= 1
            self.throttled += 1
            return False
        if not self.limiter.try_acquire(key):
            self.throttled += 1
            return False
        self.by_function[function] = self.by_function.get(function, 0) + 1
        burst = self.faults.get("burst_429")
        if burst:
            self._since_burst += 1
            if self._since_burst >= burst["every"]:
                self._since_burst = 0
                self._burst_left = burst["length"]
        return True

    def inject_error(self) -> bool:
        """Decide whether this customer-list call fails with a 500."""
        rate = self.faults.get("error_rate", 0.0)
        if rate and self.random.random() < rate:
            self.injected_errors += 1
            return True
        return False

    def stats(self) -> dict:
        """Counters for ``GET /_sim/stats``."""
        return {
            **self.limiter.stats(),
            "throttled": self.throttled,
            "injected_errors": self.injected_errors,
            "requests_by_function": dict(self.by_function),
            "campaigns": sorted(self.campaigns),
        }


def _add_promotions(state: OptimoveState, body: Any):
    if not isinstance(body, list) or not body:
        raise BadRequest("Body must be a non-empty array of promotions.")
    if len(body) > MAX_PROMOTIONS:
        raise BadRequest(f"At most {MAX_PROMOTIONS} promotions per call.")
    for item in body:
        if not (isinstance(item, dict) and isinstance(item.get("PromoCode"), str) and item["PromoCode"]
                and isinstance(item.get("PromotionName"), str)):
            raise BadRequest("Each promotion needs a PromoCode and a PromotionName.")
    for item in body:
        state.promotions[item["PromoCode"]] = item["PromotionName"]
    return None


def _get_promotions(state: OptimoveState, body: Any):
    return [{"PromoCode": code, "PromotionName": name} for code, name in state.promotions.items()]


def _register_listener(state: OptimoveState, body: Any):
    if not (isinstance(body, dict) and _is_int(body.get("EventTypeID"))
            and isinstance(body.get("ListenerURL"), str) and body["ListenerURL"]):
        raise BadRequest("EventTypeID (integer) and ListenerURL are required.")
    channel = body.get("ChannelID")
    if channel is not None and not _is_int(channel):
        raise BadRequest("ChannelID must be an integer.")
    entry = {"EventTypeID": body["EventTypeID"], "ListenerURL": body["ListenerURL"]}
    if channel is not None:
        entry["ChannelID"] = channel
    state.listeners[(body["EventTypeID"], channel)] = entry
    return None


def _unregister_listener(state: OptimoveState, body: Any):
    if not (isinstance(body, dict) and _is_int(body.get("EventTypeID"))):
        raise BadRequest("EventTypeID (integer) is required.")
    state.listeners.pop((body["EventTypeID"], body.get("ChannelID")), None)
    return None


def _get_listeners(state: OptimoveState, body: Any):
    return list(state.listeners.values())


def _update_promotion_status(state: OptimoveState, body: Any):
    if not (isinstance(body, dict) and isinstance(body.get("TimeStamp"), str)
            and _is_int(body.get("CampaignID")) and isinstance(body.get("PromosUpdated"), list)):
        raise BadRequest("TimeStamp, CampaignID (integer) and PromosUpdated (array) are required.")
    updates = body["PromosUpdated"]
    if len(updates) > MAX_PROMOS_UPDATED:
        raise BadRequest(f"At most {MAX_PROMOS_UPDATED} customers per call.")
    for item in updates:
        if not (isinstance(item, dict) and isinstance(item.get("CustomerID"), str)
                and isinstance(item.get("Status"), bool)):
            raise BadRequest("Each PromosUpdated item needs CustomerID (string) and Status (boolean).")
    stored = state.promotion_status.setdefault(body["CampaignID"], {"calls": 0, "statuses": {}})
    stored["calls"] += 1
    stored["last_timestamp"] = body["TimeStamp"]
    for item in updates:
        stored["statuses"][item["CustomerID"]] = item["Status"]
    return None


def _campaign_details(state: OptimoveState, body: Any):
    campaign_id = _int_param("CampaignID")
    if campaign_id is None:
        raise BadRequest("CampaignID is required.")
    spec = state.campaigns.get(campaign_id)
    if spec is None:
        return {"CampaignID": campaign_id, "Status": "Failed", "Error": "Campaign not found", "Channels": []}
    return {
        "CampaignID": campaign_id, "TargetGroupID": 1, "CampaignType": "Scheduled", "Duration": 7,
        "LeadTime": 0, "Notes": "", "IsMultiChannel": len(spec["channels"]) > 1, "IsRecurrence": False,
        "Status": "Successful", "Error": "",
        "Channels": [{"Id": ch, "ChannelID": ch, "Name": CHANNEL_NAMES.get(ch, f"Channel {ch}")}
                     for ch in spec["channels"]],
    }


def _execution_details(state: OptimoveState, body: Any):
    campaign_id = _int_param("CampaignID")
    if campaign_id is None:
        raise BadRequest("CampaignID is required.")
    channel_id = _int_param("ChannelID")
    top = min(_int_param("$top", MAX_PAGE), MAX_PAGE)
    skip = _int_param("$skip", 0)
    spec = state.campaigns.get(campaign_id)
    if spec is None:
        return []
    if channel_id is None:
        return campaigns.campaign_rows(spec, skip, top)
    return campaigns.channel_rows(spec, channel_id, skip, top)


METRIC_FIELDS = ("ChannelID", "CampaignID", "TemplateID", "MetricID", "MetricValue")
ATTRIBUTE_VALUE_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@.-_")


def _attribute_names() -> list[str]:
    raw = request.args.get("CustomerAttributes")
    if not raw:
        return []
    names = [name.strip() for name in raw.split(";")]
    if not all(names):
        raise BadRequest("CustomerAttributes must be attribute names separated by ';'.")
    return names


def _attribute_delimiter() -> str:
    delimiter = request.args.get("CustomerAttributesDelimiter") or ";"
    if len(delimiter) != 1 or delimiter in ATTRIBUTE_VALUE_CHARACTERS:
        raise BadRequest("CustomerAttributesDelimiter must be one character that cannot occur in "
                         "attribute values, such as ';' or ','.")
    return delimiter


def _send_details(state: OptimoveState, body: Any):
    channel_id = _int_param("ChannelID")
    campaign_id = _int_param("CampaignID")
    if channel_id is None or campaign_id is None:
        raise BadRequest("ChannelID and CampaignID are required.")
    names, delimiter = _attribute_names(), _attribute_delimiter()
    top = min(_int_param("$top", MAX_PAGE), MAX_PAGE)
    skip = _int_param("$skip", 0)
    spec = state.campaigns.get(campaign_id)
    if spec is None:
        return []
    return campaigns.send_rows(spec, channel_id, skip, top, names, delimiter)


def _update_campaign_metrics(state: OptimoveState, body: Any):
    if not isinstance(body, list) or not body:
        raise BadRequest("Body must be a non-empty array of campaign metrics.")
    for index, item in enumerate(body):
        if not isinstance(item, dict):
            raise BadRequest(f"Item {index}: each metric must be an object with {', '.join(METRIC_FIELDS)}.")
        for name in METRIC_FIELDS:
            if not _is_int(item.get(name)):
                raise BadRequest(f"Item {index}: {name} is required and must be an integer.")
    state.campaign_metrics.append([{name: item[name] for name in METRIC_FIELDS} for item in body])
    return None


def _channel_id() -> int:
    channel_id = _int_param("ChannelID", minimum=1)
    if channel_id is None:
        raise BadRequest("ChannelID is required.")
    return channel_id


def _add_channel_templates(state: OptimoveState, body: Any):
    channel_id = _channel_id()
    if not isinstance(body, list) or not body:
        raise BadRequest("Body must be a non-empty array of templates.")
    if len(body) > MAX_TEMPLATES:
        raise BadRequest(f"At most {MAX_TEMPLATES} templates per call.")
    for index, item in enumerate(body):
        if not (isinstance(item, dict) and _is_int(item.get("TemplateID"))
                and isinstance(item.get("TemplateName"), str) and item["TemplateName"].strip()):
            raise BadRequest(f"Item {index}: each template needs TemplateID (integer) and a non-empty TemplateName.")
    stored = state.channel_templates.setdefault(channel_id, {})
    for item in body:
        stored[item["TemplateID"]] = item["TemplateName"]
    return None


def _get_channel_templates(state: OptimoveState, body: Any):
    stored = state.channel_templates.get(_channel_id(), {})
    return [{"TemplateID": template_id, "TemplateName": name} for template_id, name in stored.items()]


ROUTES: dict[tuple[str, str], tuple[str, Callable]] = {
    ("integrations", "AddPromotions"): ("POST", _add_promotions),
    ("integrations", "GetPromotions"): ("GET", _get_promotions),
    ("integrations", "AddChannelTemplates"): ("POST", _add_channel_templates),
    ("integrations", "GetChannelTemplates"): ("GET", _get_channel_templates),
    ("integrations", "UpdateCustomerPromotionStatus"): ("POST", _update_promotion_status),
    ("general", "RegisterEventListener"): ("POST", _register_listener),
    ("general", "UnregisterEventListener"): ("POST", _unregister_listener),
    ("general", "GetRegisteredEventListeners"): ("GET", _get_listeners),
    ("actions", "GetCampaignDetails"): ("GET", _campaign_details),
    ("customers", "GetCustomerExecutionDetailsByCampaign"): ("GET", _execution_details),
    ("customers", "GetCustomerSendDetailsByChannel"): ("GET", _send_details),
    ("integrations", "UpdateCampaignMetrics"): ("POST", _update_campaign_metrics),
}


def _read_json_body() -> Any:
    if request.headers.get("Content-Type") != "application/json":
        raise BadRequest("The request Content-Type must be exactly application/json.")
    try:
        return json.loads(request.get_data() or b"null")
    except ValueError:
        raise BadRequest("The request body is not valid JSON.") from None


def create_optimove_app(api_key: str, rate_limit: tuple[int, float] = (50, 10.0),
                        clock: Callable[[], float] = time.monotonic) -> Flask:
    """Build the fake Optimove WSGI app for one API key and a (limit, window_seconds) rate limit."""
    app = Flask("simulator.optimove")
    state = OptimoveState(rate_limit[0], float(rate_limit[1]), clock)
    app.extensions["optimove_sim"] = state

    @app.errorhandler(BadRequest)
    def bad_request(error: BadRequest):
        return _bare(str(error), 400)

    @app.route("/<category>/<function>", methods=["GET", "POST"])
    def call(category: str, function: str):
        if request.headers.get("X-API-KEY") != api_key:
            return _bare("Unauthorized", 401)
        with state.lock:
            if not state.admit(api_key, function):
                return jsonify(TOO_MANY_REQUESTS), 429
            route = ROUTES.get((category.lower(), function))
            if route is None:
                return _bare("Not Found", 404)
            method, handler = route
            if request.method != method:
                return _bare("Method Not Allowed", 405)
            if category.lower() == "customers" and state.inject_error():
                return _bare("An error has occurred.", 500)
        body = _read_json_body() if method == "POST" else None
        with state.lock:
            result = handler(state, body)
        if result is None:
            return Response(status=200)
        # Plain json.dumps: Flask's provider sorts the keys of every row, a third of a page's cost.
        return Response(json.dumps(result, separators=(",", ":")), mimetype="application/json")

    app.register_blueprint(_admin_blueprint(state))
    return app


def _admin_blueprint(state: OptimoveState) -> Blueprint:
    admin = Blueprint("sim_admin", __name__, url_prefix="/_sim")

    @admin.post("/campaigns")
    def add_campaign():
        try:
            spec = campaigns.validate_spec(request.get_json(force=True, silent=True))
        except SpecError as error:
            return jsonify({"error": str(error)}), 400
        with state.lock:
            state.campaigns[spec["campaign_id"]] = spec
        return jsonify({
            "campaign_id": spec["campaign_id"],
            "expected_triples": campaigns.expected_triples(spec),
            "unique_customers": campaigns.unique_customers(spec),
            "customers_per_channel": campaigns.customers_per_channel(spec),
            "expected_sends": campaigns.expected_sends_count(spec),
            "schedule": spec["schedule"],
        })

    @admin.get("/stats")
    def stats():
        with state.lock:
            return jsonify(state.stats())

    @admin.post("/reset")
    def reset():
        with state.lock:
            state.reset()
        return jsonify({"reset": True})

    @admin.post("/faults")
    def faults():
        with state.lock:
            state.set_faults(request.get_json(force=True, silent=True))
            return jsonify({"faults": state.faults})

    @admin.get("/promotion-status/<int:campaign_id>")
    def promotion_status(campaign_id: int):
        with state.lock:
            stored = state.promotion_status.get(campaign_id, {"calls": 0, "statuses": {}})
            statuses = dict(stored["statuses"])
            return jsonify({
                "campaign_id": campaign_id,
                "calls": stored["calls"],
                "last_timestamp": stored.get("last_timestamp"),
                "statuses": statuses,
                "true": sum(1 for s in statuses.values() if s),
                "false": sum(1 for s in statuses.values() if not s),
            })

    @admin.get("/campaign-metrics")
    def campaign_metrics():
        campaign_id = request.args.get("campaign_id", type=int)
        with state.lock:
            calls = [[dict(item, call=number) for item in call
                      if campaign_id is None or item["CampaignID"] == campaign_id]
                     for number, call in enumerate(state.campaign_metrics, 1)]
        metrics = [item for call in calls for item in call]
        latest = {tuple(item[name] for name in METRIC_FIELDS[:4]): item for item in metrics}
        return jsonify({"calls": sum(1 for call in calls if call), "metrics": metrics,
                        "latest": [{name: item[name] for name in METRIC_FIELDS} for item in latest.values()]})

    @admin.get("/listeners")
    def listeners():
        with state.lock:
            return jsonify(list(state.listeners.values()))

    return admin
