"""Fake Optimove API: the functions the relay calls, with API key, rate limit and paging.

Paths are ``/{category}/{Function}`` (no ``/current`` prefix); the category matches
case-insensitively, the function name exactly. Admin endpoints live under ``/_sim/``.

Two clocks: ``clock`` (monotonic by default) drives the rate limit and the 2-hour availability
of cancelled-campaign lists; ``wall_clock`` (epoch seconds) stamps UpdateCustomerPromotionStatus
calls so a driver can compare them with a ClearanceRequiredBy deadline.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any, Callable

from flask import Blueprint, Flask, Response, g, jsonify, request

from simulator import campaigns
from simulator.campaigns import SpecError
from simulator.limiter import SlidingWindowLimiter

MAX_PAGE = 10_000
MAX_PROMOTIONS = 100
MAX_TEMPLATES = 100
MAX_PROMOS_UPDATED = 10_000
CANCELED_AVAILABLE_SECONDS = 2 * 3600  # GetCanceledCampaignCustomers answers for 2 hours after a cancel
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

    def __init__(self, limit: int, window: float, clock: Callable[[], float],
                 wall_clock: Callable[[], float] = time.time):
        self.lock = threading.Lock()
        self.clock, self.wall_clock = clock, wall_clock
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
        self.cancellations: dict[int, dict] = {}
        self.actions_ended: dict[str, list[dict]] = {}
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
            self.limiter.note_refused()
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

    def stats(self, since: float | None = None) -> dict:
        """Counters for ``GET /_sim/stats`` (rate-limit figures only after clock time ``since``, if given)."""
        return {
            **self.limiter.stats(since),
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
    for index, item in enumerate(body):
        if not (isinstance(item, dict) and isinstance(item.get("PromoCode"), str) and item["PromoCode"].strip()
                and isinstance(item.get("PromotionName"), str) and item["PromotionName"].strip()):
            raise BadRequest(f"Item {index}: each promotion needs a PromoCode and a non-empty PromotionName.")
    for item in body:
        state.promotions[item["PromoCode"]] = item["PromotionName"]
    return None


def _get_promotions(state: OptimoveState, body: Any):
    return [{"PromoCode": code, "PromotionName": name} for code, name in state.promotions.items()]


def _delete_promotions(state: OptimoveState, body: Any):
    """``[{"PromoCode": "WB23"}, …]``, at most 100; codes Optimove does not have are ignored."""
    if not isinstance(body, list) or not body:
        raise BadRequest("Body must be a non-empty array of promotions.")
    if len(body) > MAX_PROMOTIONS:
        raise BadRequest(f"At most {MAX_PROMOTIONS} promotions per call.")
    for index, item in enumerate(body):
        if not (isinstance(item, dict) and isinstance(item.get("PromoCode"), str) and item["PromoCode"]):
            raise BadRequest(f"Item {index}: each promotion needs a PromoCode.")
    for item in body:
        state.promotions.pop(item["PromoCode"], None)
    return None


CHANNEL_LESS_EVENTS = (5,)  # protocol 4.3: EventTypeID 5 "must be registered without ChannelID"


def _listener_channel(body: dict) -> int | None:
    channel = body.get("ChannelID")
    if channel is not None and not (_is_int(channel) and channel > 0):
        raise BadRequest("ChannelID must be a positive integer.")
    return channel


def _register_listener(state: OptimoveState, body: Any):
    """One listener per (EventTypeID, ChannelID); registering the same pair again replaces its URL
    (protocol 4.1: "only repeat to change the URL or add channels")."""
    if not (isinstance(body, dict) and _is_int(body.get("EventTypeID")) and body["EventTypeID"] > 0
            and isinstance(body.get("ListenerURL"), str) and body["ListenerURL"].strip()):
        raise BadRequest("EventTypeID (integer) and ListenerURL are required.")
    if not body["ListenerURL"].strip().lower().startswith(("http://", "https://", "http%3a", "https%3a")):
        raise BadRequest("ListenerURL must be an http(s) URL.")
    channel = _listener_channel(body)
    if channel is not None and body["EventTypeID"] in CHANNEL_LESS_EVENTS:
        raise BadRequest(f"EventTypeID {body['EventTypeID']} must be registered without a ChannelID.")
    entry = {"EventTypeID": body["EventTypeID"], "ListenerURL": body["ListenerURL"]}
    if channel is not None:
        entry["ChannelID"] = channel
    state.listeners[(body["EventTypeID"], channel)] = entry
    return None


def _unregister_listener(state: OptimoveState, body: Any):
    """`{"EventTypeID": N}` stops every registration of that type (protocol 4.2); with a ChannelID,
    only that channel's. Nothing registered is not an error."""
    if not (isinstance(body, dict) and _is_int(body.get("EventTypeID"))):
        raise BadRequest("EventTypeID (integer) is required.")
    channel = _listener_channel(body)
    for key in [k for k in state.listeners if k[0] == body["EventTypeID"] and (channel is None or k[1] == channel)]:
        del state.listeners[key]
    return None


def _get_listeners(state: OptimoveState, body: Any):
    """`[{"EventTypeID", "ChannelID" (only when registered with one), "ListenerURL"}]` by event type, channel."""
    return [dict(state.listeners[key]) for key in sorted(state.listeners, key=lambda k: (k[0], k[1] or 0))]


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
    at = g.get("received_at") or state.wall_clock()
    stored = state.promotion_status.setdefault(body["CampaignID"], _new_promotion_status())
    trues = sum(1 for item in updates if item["Status"])
    stored["calls"].append({"at": at, "size": len(updates), "true": trues, "false": len(updates) - trues,
                            "timestamp": body["TimeStamp"]})
    stored["last_timestamp"] = body["TimeStamp"]
    statuses, first_true_at = stored["statuses"], stored["first_true_at"]
    for item in updates:
        customer, status = item["CustomerID"], item["Status"]
        previous = statuses.get(customer)
        if status:
            first_true_at.setdefault(customer, at)
            stored["true"] += not previous
        elif previous:
            stored["true_then_false"] += 1
            stored["true"] -= 1
        statuses[customer] = status
    return None


def _new_promotion_status() -> dict:
    return {"calls": [], "statuses": {}, "first_true_at": {}, "true": 0, "true_then_false": 0,
            "last_timestamp": None}


def promotion_status_view(state: OptimoveState, campaign_id: int, deadline: float | None = None,
                          customers: bool = True) -> dict:
    """What ``GET /_sim/promotion-status`` answers for a campaign.

    ``calls``: one ``{"at" (epoch received), "size", "true", "false", "timestamp" (the body's)}`` per
    UpdateCustomerPromotionStatus call; ``max_call_size``, ``last_timestamp``; ``reported``,
    ``true``, ``false`` (customers by latest status); ``true_then_false`` (reports of false after
    true). With ``deadline`` (epoch): ``true_before_deadline`` and ``true_after_deadline`` (customers
    by the time of their first true) and ``calls_after_deadline``. With ``customers``: ``statuses``
    (customer -> latest status) and ``first_true_at`` (customer -> epoch).
    """
    stored = state.promotion_status.get(campaign_id) or _new_promotion_status()
    statuses, first_true_at, trues = stored["statuses"], stored["first_true_at"], stored["true"]
    view = {
        "campaign_id": campaign_id,
        "calls": [dict(call) for call in stored["calls"]],
        "max_call_size": max((call["size"] for call in stored["calls"]), default=0),
        "last_timestamp": stored["last_timestamp"],
        "reported": len(statuses),
        "true": trues,
        "false": len(statuses) - trues,
        "true_then_false": stored["true_then_false"],
    }
    if deadline is not None:
        before = sum(1 for at in first_true_at.values() if at <= deadline)
        view.update(deadline=deadline, true_before_deadline=before,
                    true_after_deadline=len(first_true_at) - before,
                    calls_after_deadline=sum(1 for call in stored["calls"] if call["at"] > deadline))
    if customers:
        view.update(statuses=dict(statuses), first_true_at=dict(first_true_at))
    return view


def _campaign_details(state: OptimoveState, body: Any):
    campaign_id = _int_param("CampaignID")
    if campaign_id is None:
        raise BadRequest("CampaignID is required.")
    spec = state.campaigns.get(campaign_id)
    if spec is None:
        return {"CampaignID": campaign_id, "Status": "Failed", "Error": "Campaign not found", "Channels": []}
    return {
        "CampaignID": campaign_id, "TargetGroupID": spec["target_group_id"], "CampaignType": "Scheduled",
        "Duration": spec["duration"],
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


def _paging() -> tuple[int, int]:
    """The ``$top`` (at most MAX_PAGE, the default) and ``$skip`` of a customer-list call."""
    return min(_int_param("$top", MAX_PAGE), MAX_PAGE), _int_param("$skip", 0)


def _required_campaign() -> int:
    campaign_id = _int_param("CampaignID")
    if campaign_id is None:
        raise BadRequest("CampaignID is required.")
    return campaign_id


def _processed_customers(state: OptimoveState, body: Any):
    campaign_id = _required_campaign()
    top, skip = _paging()
    spec = state.campaigns.get(campaign_id)
    return campaigns.processed_rows(spec, skip, top) if spec else []


def canceled_available(state: OptimoveState, cancellation: dict | None) -> bool:
    """Whether a cancellation's customer list is still served (2 hours on the state's clock)."""
    return cancellation is not None and state.clock() - cancellation["clock"] < CANCELED_AVAILABLE_SECONDS


def _canceled_customers(state: OptimoveState, body: Any):
    campaign_id = _required_campaign()
    top, skip = _paging()
    cancellation = state.cancellations.get(campaign_id)
    spec = state.campaigns.get(campaign_id)
    if spec is None or not canceled_available(state, cancellation):
        return []
    return campaigns.canceled_rows(spec, cancellation["numbers"], skip, top)


ENDED_ROW_FIELDS = ("CustomerID", "ActionID", "ChannelID", "Date", "Duration", "TargetGroupID")


def _actions_ended(state: OptimoveState, body: Any):
    day = request.args.get("Date")
    if campaigns.parse_date(day) is None:
        raise BadRequest("Date is required, as YYYY-MM-DD.")
    top, skip = _paging()
    explicit = state.actions_ended.get(day, [])
    rows = [dict(row) for row in explicit[skip:skip + top]]
    skip = max(0, skip - len(explicit))
    for campaign_id in sorted(state.campaigns):
        if len(rows) >= top:
            break
        spec = state.campaigns[campaign_id]
        count = campaigns.action_ended_count(spec, day)
        if skip >= count:
            skip -= count
            continue
        rows.extend(campaigns.action_ended_rows(spec, day, skip, top - len(rows)))
        skip = 0
    return rows


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
    ("integrations", "DeletePromotions"): ("POST", _delete_promotions),
    ("integrations", "AddChannelTemplates"): ("POST", _add_channel_templates),
    ("integrations", "GetChannelTemplates"): ("GET", _get_channel_templates),
    ("integrations", "UpdateCustomerPromotionStatus"): ("POST", _update_promotion_status),
    ("general", "RegisterEventListener"): ("POST", _register_listener),
    ("general", "UnregisterEventListener"): ("POST", _unregister_listener),
    ("general", "GetRegisteredEventListeners"): ("GET", _get_listeners),
    ("actions", "GetCampaignDetails"): ("GET", _campaign_details),
    ("customers", "GetCustomerExecutionDetailsByCampaign"): ("GET", _execution_details),
    ("customers", "GetCustomerSendDetailsByChannel"): ("GET", _send_details),
    ("customers", "GetProcessedCampaignCustomers"): ("GET", _processed_customers),
    ("customers", "GetCanceledCampaignCustomers"): ("GET", _canceled_customers),
    ("customers", "GetCustomersActionEndedByDate"): ("GET", _actions_ended),
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
                        clock: Callable[[], float] = time.monotonic,
                        wall_clock: Callable[[], float] = time.time) -> Flask:
    """Build the fake Optimove WSGI app for one API key and a (limit, window_seconds) rate limit."""
    app = Flask("simulator.optimove")
    state = OptimoveState(rate_limit[0], float(rate_limit[1]), clock, wall_clock)
    app.extensions["optimove_sim"] = state

    @app.errorhandler(BadRequest)
    def bad_request(error: BadRequest):
        return _bare(str(error), 400)

    @app.route("/<category>/<function>", methods=["GET", "POST"])
    def call(category: str, function: str):
        g.received_at = state.wall_clock()
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
            "conditional": spec["conditional"],
            "audience": campaigns.unique_customers(spec),
        })

    @admin.post("/campaigns/<int:campaign_id>/cancel")
    def cancel_campaign(campaign_id: int):
        body = request.get_json(force=True, silent=True)
        body = {} if body is None else body
        if not isinstance(body, dict) or set(body) - {"fraction", "customer_ids"}:
            return jsonify({"error": "body must be an object with fraction or customer_ids (or empty: "
                                     "every customer)"}), 400
        fraction, customer_ids = body.get("fraction", 1.0), body.get("customer_ids")
        if "fraction" in body and customer_ids is not None:
            return jsonify({"error": "give fraction or customer_ids, not both"}), 400
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            return jsonify({"error": "fraction must be a number in [0, 1]"}), 400
        if customer_ids is not None and not (isinstance(customer_ids, list)
                                             and all(isinstance(c, str) for c in customer_ids)):
            return jsonify({"error": "customer_ids must be a list of strings"}), 400
        with state.lock:
            spec = state.campaigns.get(campaign_id)
            if spec is None:
                return jsonify({"error": f"campaign {campaign_id} is unknown"}), 404
            try:
                numbers = campaigns.cancelled_numbers(spec, float(fraction), customer_ids)
            except SpecError as error:
                return jsonify({"error": str(error)}), 400
            wall = state.wall_clock()
            state.cancellations[campaign_id] = {"numbers": numbers, "clock": state.clock(), "at": wall}
        return jsonify({"campaign_id": campaign_id, "cancelled": len(numbers), "cancelled_at": wall,
                        "available_until": wall + CANCELED_AVAILABLE_SECONDS})

    @admin.get("/cancellations")
    def cancellations():
        with state.lock:
            return jsonify({str(campaign_id): {"cancelled": len(entry["numbers"]), "cancelled_at": entry["at"],
                                               "available": canceled_available(state, entry)}
                            for campaign_id, entry in sorted(state.cancellations.items())})

    @admin.post("/actions-ended")
    def add_actions_ended():
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or campaigns.parse_date(body.get("date")) is None:
            return jsonify({"error": "body must be {\"date\": \"YYYY-MM-DD\", \"rows\": [...]}"}), 400
        rows, day = body.get("rows"), body["date"]
        if not isinstance(rows, list):
            return jsonify({"error": "rows must be a list"}), 400
        defaults = {"ChannelID": 0, "Duration": 7, "TargetGroupID": 1}
        clean = []
        for index, row in enumerate(rows):
            if not (isinstance(row, dict) and isinstance(row.get("CustomerID"), str) and row["CustomerID"]
                    and not set(row) - set(ENDED_ROW_FIELDS) and row.get("Date", day) == day):
                return jsonify({"error": f"row {index}: needs CustomerID (string) and only "
                                         f"{', '.join(ENDED_ROW_FIELDS)} (Date, if given, the date)"}), 400
            row = {**defaults, **row, "Date": day}
            if not all(_is_int(row.get(name)) for name in ("ActionID", "ChannelID", "Duration", "TargetGroupID")):
                return jsonify({"error": f"row {index}: ActionID is required; ActionID, ChannelID, Duration "
                                         f"and TargetGroupID must be integers"}), 400
            clean.append({name: row[name] for name in ENDED_ROW_FIELDS})
        with state.lock:
            stored = state.actions_ended.setdefault(day, [])
            if body.get("replace"):
                stored.clear()
            stored.extend(clean)
            return jsonify({"date": day, "rows": len(stored)})

    @admin.get("/stats")
    def stats():
        since = request.args.get("since", type=float)
        with state.lock:
            return jsonify(state.stats(since))

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

    @admin.get("/promotion-status")
    @admin.get("/promotion-status/<int:campaign_id>")
    def promotion_status(campaign_id: int | None = None):
        """``?campaign_id=C[&deadline=EPOCH][&customers=0]``: see ``promotion_status_view``."""
        campaign_id = campaign_id if campaign_id is not None else request.args.get("campaign_id", type=int)
        if campaign_id is None:
            return jsonify({"error": "campaign_id (integer) is required"}), 400
        deadline = request.args.get("deadline", type=float)
        customers = request.args.get("customers", "1").lower() not in ("0", "false", "no")
        with state.lock:
            view = promotion_status_view(state, campaign_id, deadline, customers)
        return Response(json.dumps(view, separators=(",", ":")), mimetype="application/json")

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
