"""Campaign driver: plays Optimove against a running relay and summarises what happened.

It creates a multi-channel campaign in the fake Optimove, fires the EventTypeID 13
notifications out of order and with one duplicate, polls the relay's status endpoint
until every channel's run has finished, and compares the bonus ledger with the spec.
Send campaigns (flow 1) are driven by ``simulator.send_driver``; ``simulator.roles.run_for_role`` runs either.
"""

from __future__ import annotations

import random
import time
from typing import Callable

import requests

from simulator import campaigns

ROLES = ("bonus", "send")
FINISHED = ("done", "failed")
NOTIFICATION_TIME = "2026-11-27 10:00:00"


class DriverError(RuntimeError):
    """The relay or a fake server answered something the driver cannot continue from."""


def campaign_status_url(status_url: str, campaign_id: int) -> str:
    """The relay's status URL for a campaign.

    ``status_url`` may contain ``{campaign_id}``, already end with ``/campaigns/<id>``, or be
    the ``/api/campaigns`` prefix to which the id is appended.
    """
    if "{campaign_id}" in status_url:
        return status_url.format(campaign_id=campaign_id)
    base = status_url.rstrip("/")
    if base.endswith(f"/campaigns/{campaign_id}"):
        return base
    return f"{base}/{campaign_id}"


def notification_bodies(campaign_id: int, channels, rng: random.Random) -> list[dict]:
    """EventTypeID 13 bodies, one per channel, shuffled, with one delivered twice.

    Alternate bodies use PascalCase and camelCase keys, as different Optimove setups do.
    """
    bodies = []
    for index, channel in enumerate(channels):
        if index % 2 == 0:
            bodies.append({"EventTypeID": 13, "TimeStamp": NOTIFICATION_TIME,
                           "CampaignID": campaign_id, "ChannelID": channel})
        else:
            bodies.append({"eventTypeId": 13, "timeStamp": NOTIFICATION_TIME,
                           "campaignId": campaign_id, "channelId": channel})
    rng.shuffle(bodies)
    duplicate_of = rng.randrange(len(bodies))
    bodies.insert(rng.randint(duplicate_of + 1, len(bodies)), dict(bodies[duplicate_of]))
    return bodies


def _json(response: requests.Response, what: str) -> dict:
    if response.status_code != 200:
        raise DriverError(f"{what} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def _finished(status: dict, channels) -> bool:
    runs = status.get("runs") or []
    seen = {run.get("channel_id") for run in runs}
    return set(channels) <= seen and all(run.get("status") in FINISHED for run in runs)


def _fraction(status: dict, expected: int) -> float:
    totals = status.get("totals") or {}
    handled = sum(totals.get(name) or 0 for name in ("granted", "rejected", "failed"))
    return min(1.0, handled / expected) if expected else 1.0


def _poll(session, url, auth, channels, expected, deadline, progress, campaign_id) -> dict:
    last: dict | str = "no answer yet"
    while True:
        try:
            response = session.get(url, auth=auth, timeout=10)
        except requests.RequestException as exc:  # a slow or restarting relay: keep polling until the deadline
            last = f"no answer: {type(exc).__name__}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"campaign {campaign_id} not finished in time; last status: {last}") from None
            time.sleep(0.2)
            continue
        if response.status_code in (401, 403):
            raise DriverError(f"status endpoint refused credentials ({response.status_code}): {response.text[:200]}")
        if response.status_code == 200:
            last = response.json()
            if progress:
                progress(_fraction(last, expected), last)
            if _finished(last, channels):
                return last
        else:
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"campaign {campaign_id} not finished in time; last status: {last}")
        time.sleep(0.2)


def run_campaign(listener_url: str, optimove_url: str, bonus_admin_url: str, status_url: str,
                 admin_auth: tuple[str, str], channels=(504, 505, 506), customers_per_channel: int = 1000,
                 overlap: float = 0.5, codes=("WB23", "NV10"), multi_code_every: int = 2,
                 campaign_id: int | None = None, timeout: float = 120,
                 progress: Callable[[float, dict], None] | None = None) -> dict:
    """Run one campaign end to end through the relay and return the summary dict.

    ``ok`` is true when the bonus system applied exactly the expected triples, with no
    duplicate grants, and the relay reports the campaign done. Raises TimeoutError with the
    last status when the relay does not finish within ``timeout`` seconds.
    """
    rng = random.Random()
    campaign_id = campaign_id or rng.randint(100000, 999999)
    spec = {"campaign_id": campaign_id, "channels": list(channels),
            "customers_per_channel": customers_per_channel, "overlap": overlap,
            "codes": list(codes), "multi_code_every": multi_code_every}
    unique = campaigns.unique_customers(campaigns.validate_spec(spec))
    session = requests.Session()
    created = _json(session.post(f"{optimove_url.rstrip('/')}/_sim/campaigns", json=spec, timeout=10),
                    "fake Optimove /_sim/campaigns")
    ledger_url = f"{bonus_admin_url.rstrip('/')}/_sim/ledger"
    before = _json(session.get(ledger_url, timeout=10), "bonus ledger")

    started = time.monotonic()
    for body in notification_bodies(campaign_id, channels, rng):
        response = session.post(listener_url, json=body, timeout=10)
        if response.status_code not in (200, 202):
            raise DriverError(f"listener answered {response.status_code} to {body}: {response.text[:500]}")

    final = _poll(session, campaign_status_url(status_url, campaign_id), tuple(admin_auth), channels,
                  created["expected_triples"], started + timeout, progress, campaign_id)
    seconds = time.monotonic() - started
    after = _json(session.get(ledger_url, timeout=10), "bonus ledger")

    granted = after["applied"] - before["applied"]
    duplicates = after["duplicate_grants"] - before["duplicate_grants"]
    expected = created["expected_triples"]
    return {
        "campaign_id": campaign_id,
        "channels": list(channels),
        "customers_per_channel": {int(ch): n for ch, n in created["customers_per_channel"].items()},
        "expected_triples": expected,
        "granted_at_bonus_system": granted,
        "duplicate_grants": duplicates,
        "relay_status": final.get("status"),
        "relay_totals": final.get("totals", {}),
        "seconds": round(seconds, 3),
        "customers_per_second": round(unique / seconds, 1) if seconds else 0.0,
        "ok": granted == expected and duplicates == 0 and final.get("status") == "done",
    }


def format_summary(summary: dict) -> str:
    """A short human-readable report of a ``run_campaign`` summary."""
    totals = summary.get("relay_totals") or {}
    lines = [
        f"Campaign {summary['campaign_id']}: {'OK' if summary['ok'] else 'NOT OK'}"
        f" (relay status {summary.get('relay_status')})",
        f"  channels            {', '.join(str(c) for c in summary['channels'])}"
        f" ({', '.join(f'{c}: {n}' for c, n in summary['customers_per_channel'].items())} customers)",
        f"  expected triples    {summary['expected_triples']}",
        f"  granted (bonus)     {summary['granted_at_bonus_system']}",
        f"  duplicate grants    {summary['duplicate_grants']}",
        "  relay totals        " + ", ".join(f"{k} {v}" for k, v in totals.items()),
        f"  time                {summary['seconds']:.2f} s, {summary['customers_per_second']:.0f} customers/s",
    ]
    return "\n".join(lines)
