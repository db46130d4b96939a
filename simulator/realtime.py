"""Real-time driver: plays Optimove's EventTypeID 11 triggers against a running relay.

It fires one trigger per new customer at a fixed rate on an open loop (each request leaves
at its scheduled time, whatever the previous answers took), re-sends every Nth trigger to
check the listener's dedupe, then polls the fake bonus system or send service until every
acknowledged trigger's effect has arrived, and reports what was lost or duplicated and how
long each effect took from the relay's 202 to the fake receiving the call.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import requests

from simulator.driver import DriverError

ROLES = ("bonus", "send")
CODES = ("RT10", "RT25", "FS50")
TEMPLATES = (14, 15, 16)
REQUEST_TIMEOUT = 10.0
POLL_INTERVAL = 0.2
# key spellings seen from different Optimove setups; the third also sends ids as numeric strings
SPELLINGS = (
    {"event": "EventTypeID", "time": "TimeStamp", "campaign": "CampaignID", "channel": "ChannelID",
     "customer": "CustomerID", "template": "TemplateID", "codes": "PromoCode"},
    {"event": "eventTypeId", "time": "timeStamp", "campaign": "campaignId", "channel": "channelId",
     "customer": "customerId", "template": "templateId", "codes": "promoCode"},
    {"event": "eventTypeID", "time": "timeStamp", "campaign": "campaignID", "channel": "channelID",
     "customer": "customerID", "template": "templateID", "codes": "promoCode"},
)
# where the customer id and the promo code sit in each fake's ledger key
_CUSTOMER_INDEX = {"bonus": 1, "send": 2}
_PEER_NAME = {"bonus": "bonus system", "send": "send service"}


def trigger_body(role: str, index: int, campaign_id: int, channel_id: int, customer_id: str,
                 timestamp: str) -> tuple[dict, list[str]]:
    """An EventTypeID 11 body for one customer, and the promo codes it carries.

    ``index`` picks the variant: the key spelling (PascalCase, camelCase, numeric-string ids),
    one or two promo codes as a list or a comma-separated string, and for the send role a
    TemplateID, extra attributes and promo codes on every second trigger.
    """
    names = SPELLINGS[index % len(SPELLINGS)]
    as_id = str if index % len(SPELLINGS) == 2 else int
    body = {names["event"]: 11, names["time"]: timestamp, names["campaign"]: as_id(campaign_id),
            names["channel"]: as_id(channel_id), names["customer"]: customer_id}
    with_codes = role == "bonus" or index % 2 == 0
    codes = [CODES[index % len(CODES)]] + ([CODES[(index + 1) % len(CODES)]] if index % 4 in (1, 2) else [])
    if with_codes:
        body[names["codes"]] = ",".join(codes) if index % 4 >= 2 else codes
    if role == "send":
        body[names["template"]] = as_id(TEMPLATES[index % len(TEMPLATES)])
        body["Email"] = f"{customer_id}@example.com"
        body["FirstName"] = ("Ada", "Grace", "Alan")[index % 3]
    else:
        body["event_device_type"] = ("ios", "android", "web")[index % 3]
    return body, codes if with_codes else []


def recased(body: dict, index: int) -> dict:
    """The same body under another key spelling (unknown keys upper-cased)."""
    current = SPELLINGS[index % len(SPELLINGS)]
    other = SPELLINGS[(index + 1) % len(SPELLINGS)]
    rename = {current[name]: other[name] for name in current}
    return {rename.get(key, key.upper()): value for key, value in body.items()}


@dataclass
class _Trigger:
    index: int
    customer_id: str
    body: dict
    effects: list[tuple]
    resend: dict | None
    scheduled: float
    started: float | None = None
    status: int | str | None = None
    acked_at: float | None = None
    ack_ms: float | None = None
    resend_status: int | str | None = None


def percentiles(values: list[float]) -> dict:
    """p50, p95, p99 and max (nearest rank, rounded to 0.1) and the count of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None, "p99": None, "max": None, "count": 0}

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 1)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": round(ordered[-1], 1),
            "count": len(ordered)}


def _post(session: requests.Session, url: str, body: dict) -> int | str:
    """The answer's status code, or the exception's name when there was no answer."""
    try:
        return session.post(url, json=body, timeout=REQUEST_TIMEOUT).status_code
    except requests.RequestException as exc:
        return type(exc).__name__


def _fire_all(listener_url: str, triggers: list[_Trigger], rate: float, progress) -> float:
    """Send every trigger at its scheduled time; return the monotonic start of the schedule."""
    local = threading.local()

    def fire(trigger: _Trigger) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        trigger.started = time.monotonic()
        trigger.status = _post(session, listener_url, trigger.body)
        trigger.acked_at = time.time()
        trigger.ack_ms = (time.monotonic() - start - trigger.scheduled) * 1000
        # re-send only after the original is settled, so its answer has to be "duplicate"
        if trigger.resend is not None and trigger.status == 202:
            trigger.resend_status = _post(session, listener_url, trigger.resend)

    # enough threads that answers up to half a second slow do not hold up the schedule
    workers = max(16, min(128, math.ceil(rate / 2)))
    start = time.monotonic()
    last_report = 0.0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="realtime") as pool:
        for number, trigger in enumerate(triggers, 1):
            delay = start + trigger.scheduled - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the open loop's schedule, not a wait for a result
            pool.submit(fire, trigger)
            if progress and (time.monotonic() - last_report >= 0.1 or number == len(triggers)):
                last_report = time.monotonic()
                progress("sending", number, len(triggers))
    return start


def _effect_id(role: str, key: list) -> tuple:
    customer = key[_CUSTOMER_INDEX[role]]
    return (customer, key[2]) if role == "bonus" else (customer,)


def _arrivals(role: str, entries: list[dict], campaign_id: int, prefix: str) -> dict[tuple, dict]:
    """Per effect id: first receive time, applications and rejections of this run's entries."""
    arrivals: dict[tuple, dict] = {}
    for entry in entries:
        key = entry.get("key") or []
        if len(key) <= _CUSTOMER_INDEX[role] or key[0] != campaign_id:
            continue
        if not str(key[_CUSTOMER_INDEX[role]]).startswith(prefix):
            continue
        seen = arrivals.setdefault(_effect_id(role, key), {"first": math.inf, "applied": math.inf,
                                                           "applications": 0, "rejections": 0})
        seen["first"] = min(seen["first"], entry.get("first_received_at") or math.inf)
        seen["applied"] = min(seen["applied"], entry.get("applied_at") or math.inf)
        seen["applications"] += entry.get("applications", 0)
        seen["rejections"] += entry.get("rejections", 0)
    return arrivals


def _outcomes(arrival: dict | None) -> int:
    return 0 if arrival is None else arrival["applications"] + arrival["rejections"]


def _arrived(arrival: dict | None) -> bool:
    return _outcomes(arrival) > 0


def _poll_ledger(admin_url: str, role: str, campaign_id: int, prefix: str, wanted: Counter,
                 deadline: float, progress) -> tuple[dict, bool]:
    """Poll the fake's ledger until each effect arrived as often as ``wanted`` says (once per 202
    that carried it); return (arrivals, timed_out)."""
    url = f"{admin_url.rstrip('/')}/_sim/ledger"
    params = {"full": 1, "campaign_id": campaign_id, "customer_prefix": prefix}
    session = requests.Session()
    arrivals, last_error = None, "no answer yet"
    while True:
        try:
            response = session.get(url, params=params, timeout=REQUEST_TIMEOUT)
            if response.status_code == 200:
                arrivals = _arrivals(role, response.json().get("entries", []), campaign_id, prefix)
            else:
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except (requests.RequestException, ValueError) as exc:  # a busy fake: keep polling until the deadline
            last_error = f"{type(exc).__name__}: {exc}"
        if arrivals is not None:
            seen = sum(min(count, _outcomes(arrivals.get(effect))) for effect, count in wanted.items())
            if progress:
                progress("waiting", seen, sum(wanted.values()))
            if seen == sum(wanted.values()):
                return arrivals, False
        if time.monotonic() >= deadline:
            if arrivals is None:
                raise DriverError(f"cannot read the {_PEER_NAME[role]} ledger at {url}: {last_error}")
            return arrivals, True
        time.sleep(POLL_INTERVAL)


def run_realtime(listener_url: str, admin_url: str, role: str, channel_id: int,
                 campaign_id: int | None = None, rate: float = 20.0, duration: float = 10.0,
                 duplicate_every: int = 10, timeout: float = 60.0,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Fire real-time triggers at the relay for ``duration`` seconds and return the summary dict.

    ``admin_url`` is the fake bonus system's (role "bonus") or send service's (role "send")
    admin URL; nothing on it is reset, and only this run's campaign and customers count.
    ``progress(phase, done, total)`` is called with phase "sending" then "waiting". ``ok`` is
    true when no acknowledged trigger was lost, no effect was duplicated, every re-send was
    answered duplicate and every answer was 2xx. A re-send answered 202 is waited for like a
    trigger of its own, so the duplicate it causes is seen; a duplicate nothing announces is
    seen only if it arrives before the last expected effect.

    Other keys: ``sent``, ``resent``, ``accepted``, ``duplicates_answered``, ``errors`` (count
    per status or exception name), ``expected_effects``, ``effects_seen``, ``lost`` (and
    ``lost_customers``), ``duplicate_effects``, ``latency_ms`` (the 202 to the first call that
    carried the effect, the last effect of a trigger counting), ``applied_latency_ms`` (to the
    call that applied it), ``ack_ms`` (scheduled send to the answer), ``achieved_rate``.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    campaign_id = campaign_id or random.Random().randint(100000, 999999)
    prefix = f"rt-{uuid.uuid4().hex[:10]}-"
    timestamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    triggers = []
    for index in range(max(1, round(rate * duration))):
        customer = f"{prefix}{index:06d}"
        body, codes = trigger_body(role, index, campaign_id, channel_id, customer, timestamp)
        effects = [(customer, code) for code in codes] if role == "bonus" else [(customer,)]
        resend = None
        if duplicate_every and (index + 1) % duplicate_every == 0:
            exact = ((index + 1) // duplicate_every) % 2 == 1
            resend = dict(body) if exact else recased(body, index)
        triggers.append(_Trigger(index, customer, body, effects, resend, index / rate))

    start = _fire_all(listener_url, triggers, rate, progress)
    sent_at = time.monotonic()
    accepted = [t for t in triggers if t.status == 202]
    expected = {effect for trigger in accepted for effect in trigger.effects}
    wanted = Counter(effect for trigger in triggers for effect in trigger.effects
                     for status in (trigger.status, trigger.resend_status) if status == 202)
    arrivals, timed_out = _poll_ledger(admin_url, role, campaign_id, prefix, wanted,
                                       sent_at + timeout, progress)
    return _summary(role, campaign_id, channel_id, prefix, rate, duration, triggers, accepted,
                    expected, arrivals, timed_out, start, sent_at)


def _summary(role, campaign_id, channel_id, prefix, rate, duration, triggers, accepted, expected,
             arrivals, timed_out, start, sent_at) -> dict:
    errors: dict[str, int] = {}
    for status in [t.status for t in triggers] + [t.resend_status for t in triggers if t.resend_status]:
        if status not in (200, 202):
            errors[str(status)] = errors.get(str(status), 0) + 1
    resent = [t for t in triggers if t.resend_status is not None]
    latencies, applied_latencies, lost = [], [], []
    for trigger in accepted:
        effects = [arrivals.get(effect) for effect in trigger.effects]
        if not all(_arrived(effect) for effect in effects):
            lost.append(trigger.customer_id)
        elif effects:
            last = max(effect["first"] for effect in effects)
            latencies.append(max(0.0, (last - trigger.acked_at) * 1000))
            applied = max(effect["applied"] for effect in effects)
            if applied < math.inf:
                applied_latencies.append(max(0.0, (applied - trigger.acked_at) * 1000))
    started = [t.started for t in triggers if t.started is not None]
    # from the schedule's start to one interval after the last departure: the target rate at best
    span = (max(started) - start + 1 / rate) if started else 0
    duplicate_effects = sum(max(0, a["applications"] - 1) for a in arrivals.values())
    unexpected = sum(1 for effect, a in arrivals.items() if a["applications"] and effect not in expected)
    summary = {
        "role": role,
        "campaign_id": campaign_id,
        "channel_id": channel_id,
        "customer_prefix": prefix,
        "rate": rate,
        "duration": duration,
        "sent": len(triggers),
        "resent": len(resent),
        "accepted": len(accepted),
        "duplicates_answered": sum(t.resend_status == 200 for t in resent),
        "originals_answered_duplicate": sum(t.status == 200 for t in triggers),
        "errors": errors,
        "expected_effects": len(expected),
        "effects_seen": sum(_arrived(arrivals.get(effect)) for effect in expected),
        "lost": len(lost),
        "lost_customers": lost[:10],
        "duplicate_effects": duplicate_effects,
        "unexpected_effects": unexpected,
        "latency_ms": percentiles(latencies),
        "applied_latency_ms": percentiles(applied_latencies),
        "ack_ms": percentiles([t.ack_ms for t in triggers if t.ack_ms is not None]),
        "send_lag_ms_max": round(max((t.started - start - t.scheduled) * 1000 for t in triggers
                                     if t.started is not None), 1) if started else None,
        "achieved_rate": round(len(started) / span, 2) if span else 0.0,
        "timed_out": timed_out,
        "seconds_sending": round(sent_at - start, 3),
        "seconds_waiting": round(time.monotonic() - sent_at, 3),
    }
    summary["ok"] = (not lost and duplicate_effects == 0 and not errors
                     and summary["duplicates_answered"] == len(resent)
                     and summary["originals_answered_duplicate"] == 0)
    return summary


def _spread(stats: dict) -> str:
    def ms(value) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    return ", ".join(f"{name} {ms(stats[name])}" for name in ("p50", "p95", "p99", "max"))


def format_realtime_summary(summary: dict) -> str:
    """A short human-readable report of a ``run_realtime`` summary."""
    peer = _PEER_NAME.get(summary["role"], summary["role"])
    latency, applied, ack = summary["latency_ms"], summary["applied_latency_ms"], summary["ack_ms"]
    errors = ", ".join(f"{status}: {count}" for status, count in summary["errors"].items()) or "none"
    lost = f"{summary['lost']}"
    if summary["lost_customers"]:
        lost += f" (e.g. {', '.join(summary['lost_customers'][:3])})"
    lines = [
        f"Real-time campaign {summary['campaign_id']} on channel {summary['channel_id']} "
        f"({summary['role']}): {'OK' if summary['ok'] else 'NOT OK'}",
        f"  triggers            {summary['sent']} sent at {summary['achieved_rate']:.1f}/s "
        f"(target {summary['rate']:g}/s), {summary['accepted']} accepted",
        f"  re-sends            {summary['resent']} sent, {summary['duplicates_answered']} answered duplicate",
        f"  errors              {errors}",
        f"  effects             {summary['expected_effects']} expected, {summary['effects_seen']} seen "
        f"at the {peer}",
        f"  lost                {lost}" + (" (timed out waiting)" if summary["timed_out"] else ""),
        f"  duplicate effects   {summary['duplicate_effects']}",
    ]
    if summary["unexpected_effects"]:
        lines.append(f"  unexpected effects  {summary['unexpected_effects']}")
    if summary["originals_answered_duplicate"]:
        lines.append(f"  new triggers answered duplicate  {summary['originals_answered_duplicate']}")
    lines += [
        f"  202 -> {peer:<13}{_spread(latency)} (first call)",
        f"  202 -> applied      {_spread(applied)}",
        f"  listener answer     {_spread(ack)}",
        f"  time                {summary['seconds_sending']:.2f} s sending, "
        f"{summary['seconds_waiting']:.2f} s waiting",
    ]
    return "\n".join(lines)
