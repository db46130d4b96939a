"""Fake Optimove API: the functions the relay calls, with API key, rate limit and paging.

Paths are ``/{category}/{Function}`` (no ``/current`` prefix); the category matches
case-insensitively, the function name exactly. Admin endpoints live under ``/_sim/``.

Two clocks: ``clock`` (monotonic by default) drives the rate limit and the 2-hour availability
of cancelled-campaign lists; ``wall_clock`` (epoch seconds) stamps UpdateCustomerPromotionStatus
calls so a driver can compare them with a ClearanceRequiredBy deadline.

Faults (``POST /_sim/faults``, ``{}`` clears them): ``burst_429`` ``{"every": N, "length": M}``
answers M calls 429 after every N accepted ones; ``burst_500`` the same with 500 (any function,
reports included). A burst spec may also say ``skip`` (calls let through before the first burst,
default N; 0: the burst comes first), ``functions`` (only calls of these functions count and are
refused) and ``per_function`` (each function counts its own calls); either may be a list of specs.
``error_rate`` answers that fraction of customer-list calls 500. ``corrupt_row``
``{"campaign_id": C, "row": K}`` appends a NUL character to the CustomerID of the row at position K
of campaign C's customer lists (a corrupt export: valid JSON that no Postgres text column can
hold). ``GET /_sim/stats`` counts them (``throttled``, ``injected_errors``, per function, and
``last_fault_at``, the wall time of the last 429 or 500 injected).
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
FAULT_NAMES = frozenset({"burst_429", "burst_500", "error_rate", "corrupt_row", "seed"})
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


class Burst:
    """One burst fault: after every ``every`` calls let through, the next ``length`` calls are refused.

    ``skip`` calls are let through before the first burst (default ``every``; 0: it comes first);
    ``functions`` limits it to calls of those functions; with ``per_function`` each function counts
    its own calls. Not thread-safe: callers lock.
    """

    KEYS = frozenset({"every", "length", "skip", "functions", "per_function"})

    def __init__(self, spec: dict):
        self.every, self.length = spec["every"], spec["length"]
        self.skip = spec.get("skip", self.every)
        self.functions = frozenset(spec["functions"]) if spec.get("functions") is not None else None
        self.per_function = bool(spec.get("per_function"))
        self._state: dict[str | None, list[int]] = {}  # [calls to let through before the next burst, left in it]

    @classmethod
    def parse(cls, name: str, raw: Any) -> list["Burst"]:
        """The bursts of a fault setting (one spec or a list of them), or BadRequest naming ``name``."""
        specs = raw if isinstance(raw, list) else [raw]
        for spec in specs:
            if not (isinstance(spec, dict) and not set(spec) - cls.KEYS
                    and _is_int(spec.get("every")) and spec["every"] > 0
                    and _is_int(spec.get("length")) and spec["length"] >= 0
                    and (_is_int(spec.get("skip", 0)) and spec.get("skip", 0) >= 0)
                    and (spec.get("functions") is None or (isinstance(spec["functions"], list) and all(
                        isinstance(f, str) for f in spec["functions"])))
                    and isinstance(spec.get("per_function", False), bool)):
                raise BadRequest(f"{name} must be {{\"every\": N > 0, \"length\": M >= 0}} (optional \"skip\": "
                                 f"K >= 0, \"functions\": [names], \"per_function\": true), or a list of them")
        return [cls(spec) for spec in specs]

    def _counts(self, function: str) -> list[int] | None:
        if self.functions is not None and function not in self.functions:
            return None
        key = function if self.per_function else None
        counts = self._state.get(key)
        if counts is None:
            counts = self._state[key] = [self.skip, 0] if self.skip else [self.every, self.length]
        return counts

    def refuse(self, function: str) -> bool:
        """Whether this call falls in a burst (it then counts as refused, not let through)."""
        counts = self._counts(function)
        if counts is None or counts[1] <= 0:
            return False
        counts[1] -= 1
        return True

    def let_through(self, function: str) -> None:
        """Count a call let through; the ``every``-th arms the next burst."""
        counts = self._counts(function)
        if counts is not None:
            counts[0] -= 1
            if counts[0] <= 0:
                counts[:] = [self.every, self.length]


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
        self.throttled_by_function: dict[str, int] = {}
        self.errors_by_function: dict[str, int] = {}
        self.last_fault_at: float | None = None
        self.campaigns: dict[int, dict] = {}
        self.promotions: dict[str, str] = {}
        self.channel_templates: dict[int, dict[int, str]] = {}
        self.listeners: dict[tuple, dict] = {}
        self.promotion_status: dict[int, dict] = {}
        self.cancellations: dict[int, dict] = {}
        self.actions_ended: dict[str, list[dict]] = {}
        self.campaign_metrics: list[list[dict]] = []
        self._bursts: dict[str, list[Burst]] = {}

    def set_faults(self, faults: Any) -> None:
        """Validate and install fault settings; ``{}`` clears them."""
        if not isinstance(faults, dict) or set(faults) - FAULT_NAMES:
            raise BadRequest(f"faults must be an object with {', '.join(sorted(FAULT_NAMES))} (any of them)")
        bursts = {name: Burst.parse(name, faults[name]) for name in ("burst_429", "burst_500")
                  if faults.get(name) is not None}
        rate = faults.get("error_rate", 0.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise BadRequest("error_rate must be a number in [0, 1]")
        corrupt = faults.get("corrupt_row")
        if corrupt is not None and not (isinstance(corrupt, dict) and set(corrupt) <= {"campaign_id", "row"}
                                        and _is_int(corrupt.get("campaign_id"))
                                        and _is_int(corrupt.get("row", 0)) and corrupt.get("row", 0) >= 0):
            raise BadRequest("corrupt_row must be {\"campaign_id\": C, \"row\": K >= 0}")
        self.faults = dict(faults)
        self.random = random.Random(faults.get("seed"))
        self._bursts = bursts

    def admit(self, key: str, function: str) -> bool:
        """Apply injected bursts and the sliding window; True if the call is accepted."""
        bursts = self._bursts.get("burst_429", ())
        if any([burst.refuse(function) for burst in bursts]):  # a list: every burst counts the refusal
            self._note_throttled(function, injected=True)
            self.limiter.note_refused()
            return False
        if not self.limiter.try_acquire(key):
            self._note_throttled(function)
            return False
        self.by_function[function] = self.by_function.get(function, 0) + 1
        for burst in bursts:
            burst.let_through(function)
        return True

    def _note_throttled(self, function: str, injected: bool = False) -> None:
        self.throttled += 1
        self.throttled_by_function[function] = self.throttled_by_function.get(function, 0) + 1
        if injected:
            self.last_fault_at = self.wall_clock()

    def _note_error(self, function: str) -> None:
        self.injected_errors += 1
        self.errors_by_function[function] = self.errors_by_function.get(function, 0) + 1
        self.last_fault_at = self.wall_clock()

    def inject_error(self, function: str = "", customer_list: bool = True) -> bool:
        """Decide whether this accepted call fails with a 500: a ``burst_500`` (any function), or
        ``error_rate`` (customer-list calls only)."""
        bursts = self._bursts.get("burst_500", ())
        if any([burst.refuse(function) for burst in bursts]):
            self._note_error(function)
            return True
        for burst in bursts:
            burst.let_through(function)
        rate = self.faults.get("error_rate", 0.0)
        if customer_list and rate and self.random.random() < rate:
            self._note_error(function)
            return True
        return False

    def corrupted(self, campaign_id: int | None, skip: int, rows: list) -> list:
        """``rows`` (a customer-list page of ``campaign_id`` starting at ``skip``) with the ``corrupt_row``
        fault applied: a NUL character appended to that row's CustomerID."""
        corrupt = self.faults.get("corrupt_row")
        if not corrupt or campaign_id != corrupt["campaign_id"]:
            return rows
        index = corrupt.get("row", 0) - skip
        if not 0 <= index < len(rows) or not isinstance(rows[index], dict):
            return rows
        rows = list(rows)
        rows[index] = {**rows[index], "CustomerID": f"{rows[index].get('CustomerID', '')}\u0000"}
        return rows

    def stats(self, since: float | None = None) -> dict:
        """Counters for ``GET /_sim/stats`` (rate-limit figures only after clock time ``since``, if given)."""
        return {
            **self.limiter.stats(since),
            "throttled": self.throttled,
            "injected_errors": self.injected_errors,
            "requests_by_function": dict(self.by_function),
            "throttled_by_function": dict(self.throttled_by_function),
            "injected_errors_by_function": dict(self.errors_by_function),
            "last_fault_at": self.last_fault_at,
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
            if state.inject_error(function, customer_list=category.lower() == "customers"):
                return _bare("An error has occurred.", 500)
        body = _read_json_body() if method == "POST" else None
        with state.lock:
            result = handler(state, body)
            if category.lower() == "customers" and isinstance(result, list) and result:
                result = state.corrupted(_int_param("CampaignID"), _int_param("$skip", 0), result)
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
