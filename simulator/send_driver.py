"""Send-campaign driver (flow 1): plays Optimove's pre-scheduled channel execution against a relay.

It creates a send campaign in the fake Optimove whose ScheduledTimes are partly due now and
partly spread over the next ``spread`` seconds, fires the EventTypeID 13 notifications (out of
order, one duplicate), waits until every expected send reached the fake send service, and
checks each one against the spec: template, attributes, due time (the relay's
``scheduled_time``), never before its due time, exactly once.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Callable

import requests

from simulator import campaigns
from simulator.driver import DriverError, campaign_status_url, notification_bodies
from simulator.ledger import percentiles

CHANNELS = (610,)
TEMPLATES = (14, 15, 16)
ATTRIBUTES = ("Email", "Country")
POLL_INTERVAL = 0.5
TIME_TOLERANCE = 0.001  # seconds between the relay's scheduled_time and the expected due time
EXAMPLES = 10


def send_spec(campaign_id: int, channels, customers_per_channel: int, start: float, spread: float,
              due_now_fraction: float = 0.5, templates=TEMPLATES, timezone: str = "UTC",
              with_seconds: bool = True, attribute_form: str = "mixed", overlap: float = 0.0) -> dict:
    """The fake Optimove campaign spec of a send campaign starting at ``start`` (epoch seconds)."""
    return {"campaign_id": campaign_id, "channels": list(channels), "customers_per_channel": customers_per_channel,
            "overlap": overlap, "templates": list(templates), "timezone": timezone,
            "attribute_form": attribute_form,
            "schedule": {"start": start, "spread_seconds": spread, "due_now_fraction": due_now_fraction,
                         "with_seconds": with_seconds}}


def attribute_names(attributes, channel: int) -> tuple[str, ...]:
    """The names the relay requests on ``channel``: ``attributes`` is one list for every channel
    or a mapping channel -> list (a channel it does not name requests none)."""
    if isinstance(attributes, dict):
        return tuple(attributes.get(channel, ()))
    return tuple(attributes)


def _json(response: requests.Response, what: str):
    if response.status_code != 200:
        raise DriverError(f"{what} answered {response.status_code}: {response.text[:500]}")
    return response.json()


class _Ledger:
    """Reads the fake send service's ledger: cheap counters, or one campaign's entries."""

    def __init__(self, session: requests.Session, admin_url: str, campaign_id: int):
        self.session, self.campaign_id = session, campaign_id
        self.url = f"{admin_url.rstrip('/')}/_sim/ledger"

    def outcomes(self) -> int:
        """Applied plus rejected sends over the whole ledger."""
        counters = _json(self.session.get(self.url, timeout=10), "send ledger")
        return counters["applied"] + counters["rejected"]

    def entries(self) -> list[dict]:
        """This campaign's entries."""
        params = {"full": 1, "campaign_id": self.campaign_id}
        return _json(self.session.get(self.url, params=params, timeout=60), "send ledger")["entries"]


def _arrived(entries: list[dict]) -> set[tuple]:
    return {(entry["key"][1], entry["key"][2]) for entry in entries
            if entry["applications"] or entry["rejections"]}


def _wait(ledger: _Ledger, expected: set[tuple], baseline: int, deadline: float,
          progress) -> tuple[list[dict], bool]:
    """Poll until every expected (channel, customer) arrived; return (entries, timed_out).

    The ledger's counters are cheap and count other traffic too, so they can only say "not
    yet"; the campaign's entries are read when they say "maybe" and at the deadline.
    """
    next_check = len(expected)
    while True:
        try:
            counted = ledger.outcomes() - baseline
        except requests.RequestException:  # a busy fake: keep polling until the deadline
            counted = 0
        if progress:
            progress(min(1.0, counted / len(expected)) if expected else 1.0, {"arrived": counted})
        out_of_time = time.monotonic() >= deadline
        if counted >= next_check or out_of_time:
            try:
                entries = ledger.entries()
            except requests.RequestException as exc:
                if out_of_time:
                    raise DriverError(f"cannot read the send ledger at {ledger.url}: {exc}") from None
                entries = None
            if entries is not None:
                missing = len(expected - _arrived(entries))
                if not missing:
                    return entries, False
                if out_of_time:
                    return entries, True
                next_check = counted + missing  # other traffic counted too: wait for that many more
        time.sleep(POLL_INTERVAL)


def _utc(epoch: float | None) -> str:
    return "none" if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def _check(entries: list[dict], expected: dict[tuple, campaigns.ExpectedSend], fired_at: float) -> dict:
    """Compare the ledger entries of the campaign with the expected sends."""
    applications: dict[tuple, int] = {}
    rejected, unexpected, early = set(), set(), set()
    wrong = {"template": [], "time": [], "attributes": []}
    late, late_future, caught_up = [], [], []
    due_at_once = {key for key, send in expected.items() if send.due.timestamp() <= fired_at}
    backlog_done = max((entry["first_received_at"] for entry in entries
                        if (entry["key"][1], entry["key"][2]) in due_at_once), default=fired_at)
    for entry in entries:
        _, channel, customer, template, _ = entry["key"]
        key = (channel, customer)
        want = expected.get(key)
        if want is None:
            if entry["applications"]:
                unexpected.add(key)
            continue
        applications[key] = applications.get(key, 0) + entry["applications"]
        if entry["rejections"] and not entry["applications"]:
            rejected.add(key)
        label = f"{channel}/{customer}"
        due = want.due.timestamp()
        if template != want.template_id:
            wrong["template"].append(f"{label}: template {template}, expected {want.template_id}")
        if entry.get("due_at") is None or abs(entry["due_at"] - due) > TIME_TOLERANCE:
            wrong["time"].append(f"{label}: scheduled_time {_utc(entry.get('due_at'))}, expected "
                                 f"{_utc(due)} ({want.due.isoformat()})")
        if entry.get("detail") != want.attributes:
            wrong["attributes"].append(f"{label}: attributes {entry.get('detail')}, expected {want.attributes}")
        if entry.get("early") or entry["first_received_at"] < due:
            early.add(key)
        lateness = max(0.0, entry["first_received_at"] - due)
        late.append(lateness)
        if due > fired_at:
            late_future.append(lateness)
        if due > backlog_done:
            caught_up.append(lateness)
    sent = {key for key, count in applications.items() if count}
    return {
        "sent": len(sent),
        "rejected": len(rejected - sent),
        "early": len(early),
        "late_seconds": percentiles(sorted(late)),
        "late_seconds_future": percentiles(sorted(late_future)),
        "late_seconds_caught_up": percentiles(sorted(caught_up)),
        "duplicates": sum(max(0, count - 1) for count in applications.values()),
        "missing": sorted(set(expected) - sent - rejected),
        "unexpected": len(unexpected),
        "wrong_template": len(wrong["template"]),
        "wrong_time": len(wrong["time"]),
        "wrong_attributes": len(wrong["attributes"]),
        "wrong_examples": [line for lines in wrong.values() for line in lines[:EXAMPLES]],
    }


def _relay_status(session, status_url, campaign_id, admin_auth) -> dict:
    """The relay's campaign status, or {"error": ...}: informational only."""
    try:
        response = session.get(campaign_status_url(status_url, campaign_id), auth=tuple(admin_auth), timeout=10)
        if response.status_code == 200:
            return response.json()
        return {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
    except (requests.RequestException, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _metrics(session, optimove_url: str, campaign_id: int) -> list[dict]:
    """What the relay reported with UpdateCampaignMetrics for the campaign (last value per metric)."""
    url = f"{optimove_url.rstrip('/')}/_sim/campaign-metrics"
    try:
        return _json(session.get(url, params={"campaign_id": campaign_id}, timeout=10), "campaign metrics")["latest"]
    except (requests.RequestException, DriverError, KeyError):
        return []


def run_send_campaign(listener_url: str, optimove_url: str, send_admin_url: str, status_url: str | None = None,
                      admin_auth: tuple[str, str] | None = None, channels=CHANNELS,
                      customers_per_channel: int = 1000, templates=TEMPLATES, attributes=ATTRIBUTES,
                      spread: float = 60.0, due_now_fraction: float = 0.5, timezone: str = "UTC",
                      with_seconds: bool = True, attribute_form: str = "mixed", overlap: float = 0.0,
                      campaign_id: int | None = None, timeout: float = 120.0,
                      progress: Callable[[float, dict], None] | None = None, start: float | None = None) -> dict:
    """Run one send campaign end to end through the relay and return the summary dict.

    ``start`` is the campaign's clock (epoch seconds): when its first sends are due, default now. A
    start in the past stands for a campaign whose notifications arrive late, so some sends are
    already due and the rest fall due within the run.

    ``attributes`` are the names the relay asks Optimove for (its channel config): one list for
    every channel or a mapping channel -> list; ``timezone`` must be the relay's
    OPTIMOVE_TIMEZONE. The driver waits until ``timeout`` seconds after the last send falls due.
    ``ok`` is true when every expected send arrived once, none early, with the expected
    template, attributes and scheduled_time, and nothing else arrived. ``status_url`` (with
    ``admin_auth``) adds the relay's view, which does not count for ``ok``.

    Keys: ``expected_sends``, ``due_now`` (due when the notifications were fired), ``sent``,
    ``rejected``, ``early``, ``late_seconds``, ``late_seconds_future`` (only sends due after
    the notifications) and ``late_seconds_caught_up`` (only sends due after every send due at
    once had arrived: the release path alone, not the queue of the campaign's first sends;
    each {p50, p99, max, count}), ``duplicates``, ``missing`` (and
    ``missing_sends``, up to 10 "channel/customer"), ``unexpected``, ``wrong_template``,
    ``wrong_time``, ``wrong_attributes``, ``wrong_examples``, ``metrics_reported``,
    ``relay_status``, ``relay_totals``, ``timed_out``, ``seconds``.
    """
    rng = random.Random()
    campaign_id = campaign_id or rng.randint(100000, 999999)
    start = time.time() if start is None else start
    spec = campaigns.validate_spec(send_spec(campaign_id, channels, customers_per_channel, start, spread,
                                             due_now_fraction, templates, timezone, with_seconds,
                                             attribute_form, overlap))
    expected = {send.key: send for channel in spec["channels"]
                for send in campaigns.expected_sends(spec, attribute_names(attributes, channel), channel)}
    session = requests.Session()
    ledger = _Ledger(session, send_admin_url, campaign_id)
    if ledger.entries():
        raise DriverError(f"the fake send service already holds sends of campaign {campaign_id}; "
                          f"use another campaign id")
    baseline = ledger.outcomes()
    _json(session.post(f"{optimove_url.rstrip('/')}/_sim/campaigns", json=spec, timeout=10),
          "fake Optimove /_sim/campaigns")

    started = time.monotonic()
    fired_at = time.time()
    for body in notification_bodies(campaign_id, channels, rng):
        response = session.post(listener_url, json=body, timeout=10)
        if response.status_code not in (200, 202):
            raise DriverError(f"listener answered {response.status_code} to {body}: {response.text[:500]}")

    last_due = max((send.due.timestamp() for send in expected.values()), default=fired_at)
    deadline = started + max(0.0, last_due - fired_at) + timeout
    entries, timed_out = _wait(ledger, set(expected), baseline, deadline, progress)
    seconds = time.monotonic() - started
    checked = _check(entries, expected, fired_at)
    status = _relay_status(session, status_url, campaign_id, admin_auth) if status_url and admin_auth else {}
    missing = checked.pop("missing")
    summary = {
        "role": "send",
        "campaign_id": campaign_id,
        "channels": list(channels),
        "customers_per_channel": customers_per_channel,
        "templates": list(templates),
        "attributes": ({str(channel): list(names) for channel, names in attributes.items()}
                       if isinstance(attributes, dict) else list(attributes)),
        "timezone": timezone,
        "attribute_form": attribute_form,
        "with_seconds": with_seconds,
        "spread_seconds": spread,
        "expected_sends": len(expected),
        "due_now": sum(send.due.timestamp() <= fired_at for send in expected.values()),
        **checked,
        "missing": len(missing),
        "missing_sends": [f"{channel}/{customer}" for channel, customer in missing[:EXAMPLES]],
        "metrics_reported": _metrics(session, optimove_url, campaign_id),
        "relay_status": status.get("status", status.get("error")),
        "relay_totals": status.get("totals", {}),
        "timed_out": timed_out,
        "seconds": round(seconds, 3),
    }
    summary["ok"] = (summary["sent"] == len(expected) and not missing and not timed_out
                     and all(summary[name] == 0 for name in (
                         "early", "duplicates", "rejected", "unexpected", "wrong_template", "wrong_time",
                         "wrong_attributes")))
    return summary


def _spread(stats: dict) -> str:
    def seconds(value) -> str:
        return "-" if value is None else f"{value:.3f} s"

    return ", ".join(f"{name} {seconds(stats[name])}" for name in ("p50", "p99", "max"))


def _names(attributes) -> str:
    if isinstance(attributes, dict):
        return "; ".join(f"{channel}: {', '.join(names) or 'none'}" for channel, names in attributes.items())
    return ", ".join(attributes) or "none"


def format_send_summary(summary: dict) -> str:
    """A short human-readable report of a ``run_send_campaign`` summary."""
    missing = f"{summary['missing']}"
    if summary["missing_sends"]:
        missing += f" (e.g. {', '.join(summary['missing_sends'][:3])})"
    wrong = ", ".join(f"{name} {summary[f'wrong_{name}']}" for name in ("template", "time", "attributes"))
    totals = summary.get("relay_totals") or {}
    lines = [
        f"Send campaign {summary['campaign_id']}: {'OK' if summary['ok'] else 'NOT OK'}"
        f" (relay status {summary.get('relay_status')})",
        f"  channels            {', '.join(str(c) for c in summary['channels'])}"
        f" ({summary['customers_per_channel']} customers each, templates "
        f"{', '.join(str(t) for t in summary['templates'])})",
        f"  schedule            {summary['due_now']} due at once, the rest over {summary['spread_seconds']:g} s"
        f" ({summary['timezone']}, {'with' if summary['with_seconds'] else 'without'} seconds,"
        f" attributes {summary['attribute_form']}: {_names(summary['attributes'])})",
        f"  expected sends      {summary['expected_sends']}",
        f"  sent                {summary['sent']}"
        + (f", {summary['rejected']} rejected" if summary["rejected"] else ""),
        f"  early               {summary['early']}",
        f"  late                {_spread(summary['late_seconds'])}",
        f"  late (due later)    {_spread(summary['late_seconds_future'])}",
        f"  late (caught up)    {_spread(summary['late_seconds_caught_up'])}",
        f"  duplicates          {summary['duplicates']}",
        f"  missing             {missing}" + (" (timed out waiting)" if summary["timed_out"] else ""),
        f"  wrong               {wrong}" + (f", unexpected sends {summary['unexpected']}"
                                            if summary["unexpected"] else ""),
    ]
    lines += [f"    {example}" for example in summary["wrong_examples"][:3]]
    if summary["metrics_reported"]:
        lines.append("  metrics reported    " + ", ".join(
            f"channel {m['ChannelID']} template {m['TemplateID']} metric {m['MetricID']}: {m['MetricValue']}"
            for m in summary["metrics_reported"]))
    if totals:
        lines.append("  relay totals        " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    lines.append(f"  time                {summary['seconds']:.2f} s")
    return "\n".join(lines)
