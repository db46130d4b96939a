"""Operator commands on the relay's own records: re-drive parked ledger rows, inspect and replay notifications.

    relay grants retry [--campaign ID] [--status failed]
    relay sends retry [--campaign ID] [--status failed]
    relay notifications list [--status S] [--event N] [--campaign ID] [--limit N] [--json]
    relay notifications show ID [--json]
    relay notifications replay ID

They need DATABASE_URL, and REDIS_URL for what they enqueue. Re-driven rows keep their idempotency
keys; a replayed notification runs through the same ledgers, so nothing is claimed twice.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

import click

NOTIFICATION_STATUSES = ("received", "processing", "done", "ignored", "failed")
RETRY_STATUSES = ("failed",)  # parked rows; `rejected` ones were answered for good by the peer


def _fail(message: str, code: int = 2):
    click.echo(f"relay: {message}", err=True)
    sys.exit(code)


def _celery():
    from cli.common import celery_app

    return celery_app()


def _engine():
    from cli.common import load_settings
    from shared.runtime import Runtime

    return Runtime(load_settings("database_url")).engine


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_plain, ensure_ascii=False))


# -- grants / sends retry ------------------------------------------------------------------

def _retry(ledger_name: str, campaign_id: int | None, status: str) -> None:
    """Put the ledger's `status` rows (of one campaign, or of every campaign) back to `claimed` with fresh
    attempts and the same idempotency keys, and publish their deliveries."""
    from shared import repository as repo
    from shared.broker import publish
    from shared.db import unit_of_work
    from shared.flows.sweeper import LEDGERS

    ledger = next(l for l in LEDGERS if l.table.name == ledger_name)
    app, _ = _celery()
    rt = app.relay_runtime
    with unit_of_work(rt.engine) as conn:
        if campaign_id is not None and not repo.campaign_known(conn, campaign_id):
            _fail(f"campaign {campaign_id}: the relay has no notification, run or {ledger.noun} of it")
        per_campaign = repo.campaigns_with_status(conn, ledger.table, status, campaign_id)
        counts: dict[int, int] = {}
        items = []
        for campaign in per_campaign:
            counts[campaign], found = ledger.redrive(rt, conn, campaign)
            items += found
    publish(app, items)  # after the commit: a delivery never finds its row still `failed`
    total = sum(counts.values())
    where = f"campaign {campaign_id}" if campaign_id is not None else "every campaign"
    if not total:
        click.echo(f"{ledger_name}: no {status} {ledger.noun}s in {where}; nothing re-queued")
        return
    queues = sorted({item.queue for item in items})
    click.echo(f"{ledger_name}: re-queued {total} {status} {ledger.noun}(s) of {len(counts)} campaign(s) in "
               f"{len(items)} task(s) on {', '.join(queues)} (same idempotency keys)")
    for campaign, n in counts.items():
        click.echo(f"  campaign {campaign}: {n}")


def _retry_command(ledger_name: str, noun: str):
    @click.command("retry")
    @click.option("--campaign", "campaign_id", type=int, default=None, help="only this CampaignID (default: every campaign)")
    @click.option("--status", type=click.Choice(RETRY_STATUSES), default="failed", show_default=True,
                  help="which rows to re-drive")
    def retry(campaign_id: int | None, status: str) -> None:
        _retry(ledger_name, campaign_id, status)

    retry.help = (f"Deliver parked (failed) {noun}s again with the same idempotency keys: back to `claimed` with "
                  f"fresh attempts, published on their queue (grants on `grants`, real-time rows on `realtime`).")
    return retry


@click.group()
def grants() -> None:
    """The grant ledger (promo codes granted in the bonus system). Needs DATABASE_URL and REDIS_URL."""


@click.group()
def sends() -> None:
    """The send ledger (messages handed to the send service). Needs DATABASE_URL and REDIS_URL."""


grants.add_command(_retry_command("grants", "grant"))
sends.add_command(_retry_command("sends", "send"))


# -- notifications -------------------------------------------------------------------------

@click.group()
def notifications() -> None:
    """The inbox of Optimove notifications: list, show, replay. Needs DATABASE_URL (and REDIS_URL to replay)."""


@notifications.command("list")
@click.option("--status", type=click.Choice(NOTIFICATION_STATUSES), default=None, help="only this status")
@click.option("--event", "event_type", type=int, default=None, help="only this EventTypeID")
@click.option("--campaign", "campaign_id", type=int, default=None, help="only this CampaignID")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="newest N")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def notifications_list(status: str | None, event_type: int | None, campaign_id: int | None, limit: int,
                       as_json: bool) -> None:
    """The newest notifications, newest first."""
    from shared import repository as repo
    from shared.db import unit_of_work

    with unit_of_work(_engine()) as conn:
        rows = repo.list_notifications(conn, status=status, event_type=event_type, campaign_id=campaign_id,
                                       limit=limit)
    if as_json:
        _dump(rows)
        return
    if rows:
        click.echo(f"{'id':>8} {'event':>5} {'campaign':>9} {'channel':>8} {'status':<10} {'tries':>5} "
                   f"{'received':<19}  last error")
    for r in rows:
        received = r["received_at"].strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{r['id']:>8} {r['event_type']:>5} {str(r['campaign_id'] or '-'):>9} "
                   f"{str(r['channel_id'] or '-'):>8} {r['status']:<10} {r['attempts']:>5} {received:<19}  "
                   f"{(r['last_error'] or '')[:80]}")
    click.echo(f"{len(rows)} notification(s)" + (f" (the newest {limit}; --limit for more)" if len(rows) == limit else ""))


def _notification_view(conn, notification_id: int) -> dict | None:
    from shared import repository as repo

    row = repo.get_notification(conn, notification_id)
    if row is None:
        return None
    runs = repo.notification_runs(conn, notification_id)
    keep = ("id", "flow", "campaign_id", "channel_id", "status", "cursor", "fetch_done", "fetched", "claimed",
            "duplicates_skipped", "granted", "sent", "rejected", "failed", "last_error", "created_at", "finished_at")
    return {**{k: row[k] for k in ("id", "event_type", "campaign_id", "channel_id", "dedupe_key", "status",
                                   "attempts", "last_error", "received_at", "updated_at", "processed_at")},
            "payload": row["payload"],
            "runs": [{k: r[k] for k in keep} for r in runs],
            "ledgers": repo.notification_ledger_counts(conn, notification_id)}


@notifications.command("show")
@click.argument("notification_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def notifications_show(notification_id: int, as_json: bool) -> None:
    """One notification: its payload, status, the runs it opened and what they claimed."""
    from shared.db import unit_of_work

    with unit_of_work(_engine()) as conn:
        view = _notification_view(conn, notification_id)
    if view is None:
        _fail(f"notification {notification_id}: no such notification")
    if as_json:
        _dump(view)
        return
    click.echo(f"notification {view['id']}: EventTypeID {view['event_type']}, campaign {view['campaign_id']}, "
               f"channel {view['channel_id']}: {view['status']} after {view['attempts']} attempt(s)")
    click.echo(f"  received {_plain(view['received_at'])}, processed {_plain(view['processed_at']) or '-'}")
    if view["last_error"]:
        click.echo(f"  last error: {view['last_error']}")
    click.echo(f"  payload: {json.dumps(view['payload'], ensure_ascii=False)}")
    for r in view["runs"]:
        click.echo(f"  run {r['id']} ({r['flow']}): {r['status']}, cursor {r['cursor']}, fetched {r['fetched']}, "
                   f"claimed {r['claimed']}, skipped {r['duplicates_skipped']}, granted {r['granted']}, "
                   f"sent {r['sent']}, rejected {r['rejected']}, failed {r['failed']}")
    for name, counts in view["ledgers"].items():
        if counts:
            click.echo(f"  {name}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))


@notifications.command("replay")
@click.argument("notification_id", type=int)
def notifications_replay(notification_id: int) -> None:
    """Process a notification again: back to `received`, its finished runs page again from the start.

    The ledgers keep it exactly-once: rows claimed before are skipped, only what is new is claimed.
    Cancelled runs, and runs whose deadline has passed, are left alone.
    """
    from shared import dispatch, repository as repo
    from shared.broker import publish
    from shared.db import unit_of_work

    app, _ = _celery()
    with unit_of_work(app.relay_runtime.engine) as conn:
        replayed = repo.replay_notification(conn, notification_id)
    if replayed is None:
        _fail(f"notification {notification_id}: no such notification")
    item = dispatch.process_notification(notification_id, replayed["event_type"])
    publish(app, [item])
    runs = replayed["runs"]
    click.echo(f"notification {notification_id} (EventTypeID {replayed['event_type']}, campaign "
               f"{replayed['campaign_id']}): {replayed['previous']} -> received, queued on {item.queue}; "
               f"{len(runs)} run(s) reopened" + (f" ({', '.join(map(str, runs))})" if runs else ""))
