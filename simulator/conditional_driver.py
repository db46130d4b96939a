"""Conditional-execution driver (flow 4): plays Optimove's on-hold campaign against a relay.

It creates a conditional campaign without channels in the fake Optimove (every
``multi_code_every``-th customer holds all ``codes``; with ``reject_every``, every
``reject_every``-th customer also holds ``REJECT_CODE``, which the fake bonus system is told to
reject, so those customers must not be approved), fires EventTypeID 5 with ClearanceRequiredBy
= now + ``deadline_in``, and watches the fake Optimove's UpdateCustomerPromotionStatus record
until every customer is reported or the deadline (plus ``timeout``) has passed. Then it
compares, customer by customer, what the bonus system applied (and when) with what was
reported (and when).

``cancel_campaign`` plays EventTypeID 4: it marks the campaign cancelled at the fake Optimove
(GetCanceledCampaignCustomers then lists the cancelled customers for 2 hours) and notifies the
relay; ``run_conditional(cancel_after=...)`` does so mid-run and then also checks that every
grant of a cancelled customer was revoked, once, and no other grant was.
"""

from __future__ import annotations

import random
import time
from datetime import datetime
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests

from simulator import campaigns
from simulator.driver import DriverError
from simulator.optimove import MAX_PROMOS_UPDATED

CODES = ("WB23", "NV10")
REJECT_CODE = "NOGRANT"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
POLL_INTERVAL = 0.25
SETTLE_SECONDS = 1.0  # after a cancellation: how long the relay must be quiet before the run is judged


def _json(response: requests.Response, what: str):
    if response.status_code != 200:
        raise DriverError(f"{what} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ValueError, ZoneInfoNotFoundError):
        raise ValueError(f"timezone must be an IANA time zone name such as Europe/Berlin, got {timezone!r}") from None


def optimove_time(epoch: float, timezone: str = "UTC") -> tuple[str, float]:
    """``epoch`` written as Optimove does ("YYYY-MM-DD HH:MM:SS" in ``timezone``), and the instant
    that text denotes (``epoch`` truncated to the second)."""
    zone = _zone(timezone)
    text = datetime.fromtimestamp(epoch, zone).strftime(TIME_FORMAT)
    return text, datetime.strptime(text, TIME_FORMAT).replace(tzinfo=zone).timestamp()


def conditional_spec(campaign_id: int, customers: int, codes=CODES, multi_code_every: int = 2,
                     reject_every: int = 0) -> dict:
    """The fake Optimove spec of a conditional campaign without channels (customer numbers
    ``0 .. customers - 1``); with ``reject_every`` every such customer also holds REJECT_CODE."""
    spec = {"campaign_id": campaign_id, "conditional": True, "channels": [], "customers_per_channel": customers,
            "codes": list(codes), "multi_code_every": multi_code_every}
    if reject_every:
        spec.update(extra_code=REJECT_CODE, extra_code_every=reject_every)
    return spec


def _reject_at_bonus(session: requests.Session, bonus_admin_url: str, code: str) -> None:
    """Add ``code`` to the fake bonus system's reject_codes (keeping the ones already set)."""
    url = f"{bonus_admin_url.rstrip('/')}/_sim/config"
    current = _json(session.post(url, json={}, timeout=10), "bonus /_sim/config")["config"]
    codes = list(current.get("reject_codes") or ())
    if code not in codes:
        _json(session.post(url, json={"reject_codes": codes + [code]}, timeout=10), "bonus /_sim/config")


def _notify(session: requests.Session, listener_url: str, body: dict) -> int:
    response = session.post(listener_url, json=body, timeout=10)
    if response.status_code not in (200, 202):
        raise DriverError(f"listener answered {response.status_code} to {body}: {response.text[:500]}")
    return response.status_code


def cancel_campaign(listener_url: str, optimove_url: str, campaign_id: int, customers=1.0,
                    timezone: str = "UTC", session: requests.Session | None = None) -> dict:
    """Play EventTypeID 4: mark the campaign cancelled at the fake Optimove, then notify the relay.

    ``customers`` is the fraction of the campaign's customers cancelled (evenly spread; 1.0 or None:
    all) or a list of customer ids. Returns the fake's answer (``campaign_id``, ``cancelled``,
    ``cancelled_at``, ``available_until``) plus the ``notification`` posted.
    """
    session = session or requests.Session()
    if customers is None:
        body = {}
    elif isinstance(customers, (list, tuple, set, frozenset)):
        body = {"customer_ids": list(customers)}
    else:
        body = {"fraction": float(customers)}
    marked = _json(session.post(f"{optimove_url.rstrip('/')}/_sim/campaigns/{campaign_id}/cancel", json=body,
                                timeout=10), "fake Optimove cancel")
    stamp, _ = optimove_time(time.time(), timezone)
    notification = {"EventTypeID": 4, "TimeStamp": stamp, "CampaignID": campaign_id}
    _notify(session, listener_url, notification)
    return {**marked, "notification": notification}


class _Watch:
    """Reads what the run produced: promotion statuses at the fake Optimove, grants at the fake bonus system."""

    def __init__(self, session: requests.Session, optimove_url: str, bonus_admin_url: str, campaign_id: int,
                 deadline: float):
        self.session, self.campaign_id, self.deadline = session, campaign_id, deadline
        self.status_url = f"{optimove_url.rstrip('/')}/_sim/promotion-status"
        self.ledger_url = f"{bonus_admin_url.rstrip('/')}/_sim/ledger"

    def statuses(self, customers: bool) -> dict:
        """Counts only (cheap, for polling), or everything with each customer's status and first true."""
        params = {"campaign_id": self.campaign_id, "customers": int(customers)}
        if customers:
            params["deadline"] = self.deadline
        return _json(self.session.get(self.status_url, params=params, timeout=60), "fake Optimove promotion-status")

    def entries(self) -> list[dict]:
        """This campaign's grants at the bonus system."""
        params = {"full": 1, "campaign_id": self.campaign_id}
        return _json(self.session.get(self.ledger_url, params=params, timeout=60), "bonus ledger")["entries"]

    def activity(self) -> tuple:
        """The bonus system's counters (cheap, but over every campaign): they change while anyone grants
        or revokes."""
        counters = _json(self.session.get(self.ledger_url, timeout=10), "bonus ledger")
        return tuple(counters[name] for name in ("calls", "items_received", "revoke_calls", "revokes_received"))


def _unrevoked(entries: list[dict], cancelled: set[str]) -> int:
    """How many of ``entries`` are applied, not revoked, grants of a customer in ``cancelled``."""
    return sum(1 for entry in entries
               if entry["key"][1] in cancelled and entry["applications"] and not entry["revoked"])


class _Cancellation:
    """A cancellation ``after`` seconds into the run; ``fire`` cancels and returns the cancelled customer ids."""

    def __init__(self, after: float, fire: Callable[[], set[str]]):
        self.after, self.fire = after, fire
        self.customers: set[str] | None = None  # set once fired

    def poll(self, elapsed: float) -> None:
        """Fire when its time has come."""
        if self.customers is None and elapsed >= self.after:
            self.customers = self.fire()


def _wait(watch: _Watch, audience: int, started: float, stop_at: float, progress,
          cancellation: _Cancellation | None) -> bool:
    """Poll until every customer is reported or, with a cancellation, until it fired, every grant of
    a customer it covers is revoked and neither reports nor bonus calls changed for SETTLE_SECONDS
    (after a cancellation the relay may well stop reporting), or until ``stop_at`` (monotonic).
    True if it stopped on time rather than done."""
    last, quiet_since = None, time.monotonic()
    while True:
        if cancellation is not None:
            cancellation.poll(time.monotonic() - started)
        try:
            reported = watch.statuses(customers=False)["reported"]
            snapshot = (reported, watch.activity())
        except requests.RequestException:  # a busy fake: keep polling until the deadline
            reported, snapshot = 0, None
        if progress:
            progress(min(1.0, reported / audience) if audience else 1.0, {"reported": reported, "customers": audience})
        if cancellation is None:
            if reported >= audience:
                return False
        elif cancellation.customers is not None and snapshot is not None:
            if snapshot != last:
                last, quiet_since = snapshot, time.monotonic()
            elif (time.monotonic() - quiet_since >= SETTLE_SECONDS
                  and _unrevoked(watch.entries(), cancellation.customers) == 0):
                return False
        if time.monotonic() >= stop_at:
            return True
        time.sleep(POLL_INTERVAL)


def _evaluate(spec: dict, status: dict, entries: list[dict], deadline: float, cancelled: set[str]) -> dict:
    """Compare, customer by customer, grants at the bonus system with the promotion statuses reported."""
    statuses, first_true_at = status["statuses"], status["first_true_at"]
    applied: dict[str, dict[str, float]] = {}
    rejected: set[str] = set()
    duplicates = grants_after = revoked = revoked_not_cancelled = double_revokes = cancelled_granted = 0
    cancelled_unrevoked: set[str] = set()
    for entry in entries:
        _, customer, code, _ = entry["key"]
        duplicates += max(0, entry["applications"] - 1)
        double_revokes += max(0, entry.get("revocations", 0) - 1)
        if entry["applications"]:
            applied.setdefault(customer, {})[code] = entry["applied_at"]
            if entry["applied_at"] > deadline:
                grants_after += 1
        elif entry["rejections"]:
            rejected.add(customer)
        if entry.get("revoked"):
            revoked += 1
            revoked_not_cancelled += customer not in cancelled
        elif entry["applications"] and customer in cancelled:
            cancelled_unrevoked.add(customer)
    counts = dict.fromkeys(("granted", "approved_before_deadline", "approved_after_deadline", "reported_false",
                            "unreported", "granted_not_approved", "approved_without_grant", "expected_approved",
                            "expected_false", "missed"), 0)
    for number in campaigns.audience_numbers(spec):
        customer = campaigns.customer_id(number)
        codes = campaigns.promo_codes_for(spec, number)
        granted = applied.get(customer, {})
        fully = all(code in granted for code in codes)
        first_true = first_true_at.get(customer)
        on_time = first_true is not None and first_true <= deadline
        is_cancelled = customer in cancelled
        counts["granted"] += fully
        cancelled_granted += bool(is_cancelled and granted)
        counts["approved_before_deadline"] += on_time
        counts["approved_after_deadline"] += first_true is not None and not on_time
        counts["reported_false"] += statuses.get(customer) is False
        counts["unreported"] += customer not in statuses
        counts["approved_without_grant"] += first_true is not None and (
            not fully or max(granted[code] for code in codes) > first_true)
        rejectable = campaigns.holds_extra_code(spec, number)
        counts["expected_false"] += rejectable
        counts["expected_approved"] += not rejectable
        if not is_cancelled:
            counts["granted_not_approved"] += fully and not on_time
            counts["missed"] += not rejectable and not on_time
    return {
        **counts,
        "grants_applied": sum(len(codes) for codes in applied.values()),
        "customers_rejected": len(rejected),
        "grants_after_deadline": grants_after,
        "duplicate_grants": duplicates,
        "cancelled": len(cancelled),
        "cancelled_granted": cancelled_granted,
        "cancelled_not_revoked": len(cancelled_unrevoked),
        "revoked": revoked,
        "revoked_not_cancelled": revoked_not_cancelled,
        "double_revokes": double_revokes,
    }


def run_conditional(listener_url: str, optimove_url: str, bonus_admin_url: str, customers: int = 1000,
                    deadline_in: float = 60.0, campaign_id: int | None = None, codes=CODES,
                    multi_code_every: int = 2, reject_every: int = 0, timezone: str = "UTC",
                    timeout: float = 5.0, progress: Callable[[float, dict], None] | None = None,
                    cancel_after: float | None = None, cancel_customers=1.0) -> dict:
    """Run one conditional campaign (flow 4) end to end through the relay and return the summary dict.

    ``deadline_in``: seconds from now to ClearanceRequiredBy, written in ``timezone`` (the relay's
    OPTIMOVE_TIMEZONE) and truncated to the second. The driver watches until every customer is
    reported or ``timeout`` seconds after the deadline (late reports and grants are counted).
    ``reject_every``: every such customer also holds REJECT_CODE, which the fake bonus system is
    told to reject, so the relay must not approve them. ``cancel_after``: seconds after EventTypeID
    5 to cancel ``cancel_customers`` (see ``cancel_campaign``); the driver then waits until every
    grant of a cancelled customer is revoked and the relay has been quiet for a second (or until
    ``timeout`` after the deadline or the cancellation, whichever is later). ``ok``: every
    customer to approve was approved in time (not required after a cancellation, which cancels
    the campaign as a whole), nothing approved or granted after the deadline, nobody approved
    before all their codes were granted, no duplicate grants, report calls within 10,000
    customers, no rate-limit window above the limit; after a cancellation, every grant of a
    cancelled customer revoked exactly once and no other grant revoked.

    Keys: ``campaign_id``, ``customers``, ``codes``, ``multi_code_every``, ``reject_every``,
    ``reject_code``, ``timezone``, ``clearance_required_by`` (the text sent), ``deadline`` (epoch),
    ``deadline_in``, ``expected_approved`` (customers without REJECT_CODE), ``expected_false``
    (with it), ``granted_at_bonus_system``
    (customers with all their codes applied), ``grants_applied``, ``customers_rejected``,
    ``approved_before_deadline``, ``approved_after_deadline`` (must be 0), ``reported_false``,
    ``unreported``, ``missed`` (customers to approve, not cancelled, that were not approved in
    time), ``granted_not_approved`` (not cancelled, granted, but not approved in time),
    ``approved_without_grant``
    (approved before all their codes were applied, or never), ``grants_after_deadline`` (must be 0),
    ``duplicate_grants``, ``report_calls``, ``report_calls_after_deadline``, ``max_report_call_size``
    (must be <= ``max_report_call_limit``), ``true_then_false``, ``max_requests_in_window``,
    ``rate_limit``, ``rate_window_seconds``, ``throttled``, ``cancelled``, ``cancelled_granted``,
    ``cancelled_not_revoked``, ``revoked``, ``revoked_not_cancelled``, ``double_revokes``,
    ``timed_out``, ``seconds``, ``ok``.
    """
    if deadline_in <= 0:
        raise ValueError("deadline_in must be positive")
    rng = random.Random()
    campaign_id = campaign_id or rng.randint(100000, 999999)
    _zone(timezone)
    spec = campaigns.validate_spec(conditional_spec(campaign_id, customers, codes, multi_code_every, reject_every))
    session = requests.Session()
    optimove = optimove_url.rstrip("/")
    if _json(session.get(f"{bonus_admin_url.rstrip('/')}/_sim/ledger",
                         params={"full": 1, "campaign_id": campaign_id}, timeout=60), "bonus ledger")["entries"]:
        raise DriverError(f"the fake bonus system already holds grants of campaign {campaign_id}; "
                          f"use another campaign id")
    if reject_every:
        _reject_at_bonus(session, bonus_admin_url, REJECT_CODE)
    before = _json(session.get(f"{optimove}/_sim/stats", timeout=10), "fake Optimove stats")
    _json(session.post(f"{optimove}/_sim/campaigns", json=spec, timeout=10), "fake Optimove /_sim/campaigns")

    started = time.monotonic()
    now = time.time()
    stamp, _ = optimove_time(now, timezone)
    clearance, deadline = optimove_time(now + deadline_in, timezone)
    _notify(session, listener_url, {"EventTypeID": 5, "TimeStamp": stamp, "CampaignID": campaign_id,
                                    "ClearanceRequiredBy": clearance})

    def fire() -> set[str]:
        cancel_campaign(listener_url, optimove_url, campaign_id, cancel_customers, timezone, session)
        if isinstance(cancel_customers, (list, tuple, set, frozenset)):
            return set(cancel_customers)
        fraction = 1.0 if cancel_customers is None else float(cancel_customers)
        return {campaigns.customer_id(n) for n in campaigns.cancelled_numbers(spec, fraction)}

    cancellation = None if cancel_after is None else _Cancellation(cancel_after, fire)
    watch = _Watch(session, optimove_url, bonus_admin_url, campaign_id, deadline)
    stop_at = started + max(0.0, deadline - now) + timeout
    if cancel_after is not None:
        stop_at = max(stop_at, started + cancel_after + timeout)
    timed_out = _wait(watch, campaigns.unique_customers(spec), started, stop_at, progress, cancellation)
    seconds = time.monotonic() - started
    status = watch.statuses(customers=True)
    after = _json(session.get(f"{optimove}/_sim/stats", params={"since": before["clock_now"]}, timeout=10),
                  "fake Optimove stats")
    cancelled = cancellation.customers if cancellation is not None else None
    checked = _evaluate(spec, status, watch.entries(), deadline, cancelled or set())
    summary = {
        "campaign_id": campaign_id,
        "customers": customers,
        "codes": list(codes),
        "multi_code_every": multi_code_every,
        "reject_every": reject_every,
        "reject_code": REJECT_CODE if reject_every else None,
        "timezone": timezone,
        "clearance_required_by": clearance,
        "deadline": deadline,
        "deadline_in": deadline_in,
        "expected_approved": checked.pop("expected_approved"),
        "expected_false": checked.pop("expected_false"),
        "granted_at_bonus_system": checked.pop("granted"),
        **checked,
        "report_calls": len(status["calls"]),
        "report_calls_after_deadline": status["calls_after_deadline"],
        "max_report_call_size": status["max_call_size"],
        "max_report_call_limit": MAX_PROMOS_UPDATED,
        "true_then_false": status["true_then_false"],
        "max_requests_in_window": after["max_requests_in_window"],
        "rate_limit": after["limit"],
        "rate_window_seconds": after["window_seconds"],
        "throttled": after["throttled"] - before["throttled"],
        "timed_out": timed_out,
        "seconds": round(seconds, 3),
    }
    # a cancelled campaign is cancelled as a whole: the relay may stop approving customers off the list too
    approvals = ("missed", "granted_not_approved") if cancellation is None else ()
    summary["ok"] = (summary["max_report_call_size"] <= MAX_PROMOS_UPDATED
                     and summary["max_requests_in_window"] <= summary["rate_limit"]
                     and (cancellation is None or cancelled is not None)
                     and all(summary[name] == 0 for name in (
                         *approvals, "approved_after_deadline", "grants_after_deadline", "approved_without_grant",
                         "duplicate_grants", "cancelled_not_revoked", "revoked_not_cancelled", "double_revokes")))
    return summary


def _nth(n: int) -> str:
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def format_conditional_summary(summary: dict) -> str:
    """A short human-readable report of a ``run_conditional`` summary."""
    holders = []
    if summary["multi_code_every"]:
        holders.append(f"every {_nth(summary['multi_code_every'])} holds all")
    if summary["reject_every"]:
        holders.append(f"every {_nth(summary['reject_every'])} also holds {summary['reject_code']}, "
                       f"which the bonus system rejects")
    missed = summary["missed"]
    lines = [
        f"Conditional campaign {summary['campaign_id']}: {'OK' if summary['ok'] else 'NOT OK'}",
        f"  customers           {summary['customers']} (codes {', '.join(summary['codes'])}"
        + (f"; {'; '.join(holders)}" if holders else "") + ")",
        f"  clearance by        {summary['clearance_required_by']} {summary['timezone']}"
        f" ({summary['deadline_in']:g} s after the notification)",
        f"  granted (bonus)     {summary['granted_at_bonus_system']} customers, {summary['grants_applied']} codes"
        + (f", {summary['grants_after_deadline']} after the deadline" if summary["grants_after_deadline"] else ""),
        f"  approved in time    {summary['approved_before_deadline']} of {summary['expected_approved']} expected"
        + (f" ({missed} not cancelled missed)" if missed and summary["cancelled"] else
           f" ({missed} missed)" if missed else ""),
        f"  approved late       {summary['approved_after_deadline']}",
        f"  reported false      {summary['reported_false']} ({summary['expected_false']} expected), "
        f"unreported {summary['unreported']}",
        f"  granted, not approved in time  {summary['granted_not_approved']}; approved without grant "
        f"{summary['approved_without_grant']}; duplicate grants {summary['duplicate_grants']}",
        f"  reports             {summary['report_calls']} calls, largest {summary['max_report_call_size']}"
        f" (limit {summary['max_report_call_limit']})"
        + (f", {summary['report_calls_after_deadline']} after the deadline"
           if summary["report_calls_after_deadline"] else ""),
        f"  rate limit          at most {summary['max_requests_in_window']} requests in "
        f"{summary['rate_window_seconds']:g} s (limit {summary['rate_limit']}), {summary['throttled']} throttled",
    ]
    if summary["cancelled"]:
        lines.append(f"  cancelled           {summary['cancelled']} customers, {summary['cancelled_granted']} granted;"
                     f" {summary['revoked']} grants revoked, {summary['cancelled_not_revoked']} customers not "
                     f"revoked, {summary['revoked_not_cancelled']} revoked wrongly, {summary['double_revokes']} "
                     f"double revokes")
    lines.append(f"  time                {summary['seconds']:.2f} s" + (" (watched until after the deadline)"
                                                                     if summary["timed_out"] else ""))
    return "\n".join(lines)
