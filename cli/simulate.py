"""`relay simulate`: play Optimove against a running relay, or serve the fake peers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _up_info(data_dir: Path) -> dict:
    path = data_dir / "up.json"
    if not path.exists():
        raise click.ClickException(f"no running relay found: {path} is missing (start one with `relay up`)")
    info = json.loads(path.read_text())
    if "simulator" not in info:
        raise click.ClickException("the relay in this data folder runs without the simulator "
                                   "(OPTIMOVE_API_URL is set); nothing to simulate against")
    return info


@click.group()
def simulate() -> None:
    """The simulator: fake Optimove, bonus system and send service, and drivers that play Optimove."""


@simulate.command("campaign")
@click.option("--data-dir", default=".relay", show_default=True, type=click.Path(path_type=Path),
              help="data folder of the running `relay up`")
@click.option("--role", type=click.Choice(["bonus", "send"]), default="bonus", show_default=True,
              help="grant promo codes (bonus, flow 3) or send templates at their ScheduledTime (send, flow 1)")
@click.option("--channels", default=None,
              help="comma-separated channel ids  [default: 504,505,506 (bonus), 610 (send)]")
@click.option("--customers", default=2000, show_default=True, help="customers per channel")
@click.option("--overlap", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="fraction shared by consecutive channels  [default: 0.5 (bonus), 0 (send)]")
@click.option("--multi-code-every", default=2, show_default=True,
              help="bonus: every Nth customer holds two promo codes (0: none)")
@click.option("--spread", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="send: seconds over which the sends not due at once fall due")
@click.option("--due-now", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="send: fraction of the sends due when the campaign is created")
@click.option("--templates", default="14,15,16", show_default=True,
              help="send: comma-separated template ids, spread over the customers")
@click.option("--attributes", default=None,
              help="send: comma-separated attribute names the relay requests  [default: the channel's "
                   "'attributes' in the relay's channel config, else Email,Country]")
@click.option("--timezone", default="UTC", show_default=True, envvar="OPTIMOVE_TIMEZONE",
              help="send: time zone the ScheduledTime values are written in; must be the relay's "
                   "OPTIMOVE_TIMEZONE (read from it when set)")
@click.option("--attribute-form", type=click.Choice(["list", "string", "mixed"]), default="mixed",
              show_default=True, help="send: CustomerAttributes as a list, CustomerAttribute as one joined "
                                      "string, or both (alternating customers)")
@click.option("--seconds/--no-seconds", "with_seconds", default=True, show_default=True,
              help="send: ScheduledTime with or without seconds")
@click.option("--campaign-id", type=int, default=None, help="default: a random one")
@click.option("--timeout", default=300.0, show_default=True,
              help="seconds to wait for the relay (send: after the last send falls due)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def campaign(data_dir: Path, role: str, channels: str | None, customers: int, overlap: float | None,
             multi_code_every: int, spread: float, due_now: float, templates: str, attributes: str | None,
             timezone: str, attribute_form: str, with_seconds: bool, campaign_id: int | None, timeout: float,
             as_json: bool) -> None:
    """Create a campaign, fire its notifications at the relay, wait for its effects, and summarise.

    With --role send (flow 1) the campaign's ScheduledTimes are partly due at once and partly
    spread over --spread seconds; the run fails when a send arrives early, twice, with the wrong
    template, attributes or scheduled_time, or not at all.
    """
    from simulator.roles import format_for_role, run_for_role

    channel_ids = _int_list(channels or ("610" if role == "send" else ",".join(CAMPAIGN_CHANNELS)), "--channels")
    info = _up_info(data_dir)
    sim = info["simulator"]
    admin_url = sim.get(f"{role}_admin_url")
    if not admin_url:
        raise click.ClickException(f"the running simulator has no fake {role} service; restart `relay up`")
    if role == "send":
        options = dict(
            overlap=overlap or 0.0, templates=_int_list(templates, "--templates"),
            attributes=_send_attributes(info, channel_ids, attributes), spread=spread,
            due_now_fraction=due_now, timezone=timezone, with_seconds=with_seconds,
            attribute_form=attribute_form)
    else:
        options = dict(overlap=0.5 if overlap is None else overlap, multi_code_every=multi_code_every)
    bar = None if as_json else click.progressbar(length=1000, label="sending" if role == "send" else "granting",
                                                 file=sys.stderr)

    def progress(fraction: float, _status: dict) -> None:
        if bar is not None:
            bar.update(max(0, int(fraction * 1000) - bar.pos))

    kwargs = dict(listener_url=info["listener_url"], optimove_url=sim["optimove_url"], admin_url=admin_url,
                  status_url=info["url"] + "/api/campaigns/{campaign_id}",
                  admin_auth=(info["admin_user"], info["admin_password"]), channels=channel_ids,
                  customers_per_channel=customers, campaign_id=campaign_id, timeout=timeout,
                  progress=progress, **options)
    try:
        if bar is not None:
            with bar:
                summary = run_for_role(role, **kwargs)
        else:
            summary = run_for_role(role, **kwargs)
    except (TimeoutError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # a spec the fake Optimove refuses, e.g. an unknown --timezone
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary, indent=2) if as_json else format_for_role(summary))
    sys.exit(0 if summary.get("ok") else 1)


def _int_list(text: str, hint: str) -> tuple[int, ...]:
    try:
        values = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise click.BadParameter("comma-separated integers", param_hint=hint) from None
    if not values:
        raise click.BadParameter("at least one id", param_hint=hint)
    return values


def _channel_entries(info: dict) -> dict[str, dict]:
    """The relay's channel config from up.json: channel id -> {"role": ..., "attributes": [...]}."""
    attributes = info.get("channel_attributes") or {}
    return {str(key): {**(value if isinstance(value, dict) else {"role": value}),
                       **({"attributes": attributes[str(key)]} if str(key) in attributes else {})}
            for key, value in (info.get("channels") or {}).items()}


def _send_attributes(info: dict, channels: tuple[int, ...], names: str | None):
    """The attribute names the relay requests: --attributes for every channel, else per channel from the
    relay's channel config (Email, Country when it names none). Checks the channels are send channels."""
    entries = _channel_entries(info)
    for channel in channels:
        role = entries.get(str(channel), {}).get("role")
        if entries and role not in (None, "send"):
            raise click.BadParameter(f"channel {channel} has role {role!r} in the relay's channel config, "
                                     f"not 'send'", param_hint="--channels")
    if names is not None:
        return tuple(name.strip() for name in names.split(",") if name.strip())
    if "channel_attributes" not in info:  # an up.json written before attributes were listed
        return {channel: tuple(entries.get(str(channel), {}).get("attributes") or ("Email", "Country"))
                for channel in channels}
    return {channel: tuple(entries.get(str(channel), {}).get("attributes") or ()) for channel in channels}


# the campaign driver's default channels; a real-time run prefers a channel of its own
CAMPAIGN_CHANNELS = ("504", "505", "506")


def _realtime_channel(info: dict, role: str, channel: int | None) -> int:
    """The channel to trigger: ``channel`` if given (checked against the relay's roles), else the
    first channel with ``role`` outside the campaign driver's 504-506, else the first with it."""
    roles = {str(key): value.get("role") if isinstance(value, dict) else value
             for key, value in (info.get("channels") or {}).items()}
    if channel is not None:
        if roles.get(str(channel), role) != role:
            raise click.BadParameter(f"channel {channel} has role {roles[str(channel)]!r} in the relay's "
                                     f"channel config, not {role!r}", param_hint="--channel")
        return channel
    matching = [key for key, value in roles.items() if value == role]
    if not matching:
        raise click.ClickException(
            f"no channel of the running relay has the role {role!r}. Point RELAY_CHANNEL_CONFIG at a "
            f"JSON file such as {{\"default_role\": \"bonus\", \"channels\": {{\"610\": {{\"role\": "
            f"\"{role}\"}}}}}}, restart `relay up`, or pass --channel")
    preferred = [key for key in matching if key not in CAMPAIGN_CHANNELS]
    return int((preferred or matching)[0])


@simulate.command("realtime")
@click.option("--data-dir", default=".relay", show_default=True, type=click.Path(path_type=Path),
              help="data folder of the running `relay up`")
@click.option("--rate", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="triggers per second")
@click.option("--duration", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds of triggers")
@click.option("--role", type=click.Choice(["bonus", "send"]), default="bonus", show_default=True,
              help="grant promo codes (bonus) or send a template (send)")
@click.option("--channel", type=int, default=None,
              help="default: the relay's first channel with the role, preferring one outside 504-506")
@click.option("--campaign-id", type=int, default=None, help="default: a random one")
@click.option("--timeout", default=60.0, show_default=True,
              help="seconds to wait for the effects after the last trigger")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def realtime(data_dir: Path, rate: float, duration: float, role: str, channel: int | None,
             campaign_id: int | None, timeout: float, as_json: bool) -> None:
    """Fire real-time triggers (EventTypeID 11) at the relay, wait for their effects, and summarise."""
    from simulator.realtime import format_realtime_summary, run_realtime

    info = _up_info(data_dir)
    admin_url = info["simulator"].get(f"{role}_admin_url")
    if not admin_url:
        raise click.ClickException(f"the running simulator has no fake {role} service; restart `relay up`")
    channel_id = _realtime_channel(info, role, channel)

    def progress(phase: str, done: int, total: int) -> None:
        if not as_json:
            click.echo(f"\r{phase:<8} {done}/{total}   ", nl=False, err=True)

    try:
        summary = run_realtime(info["listener_url"], admin_url, role, channel_id, campaign_id=campaign_id,
                               rate=rate, duration=duration, timeout=timeout, progress=progress)
    except (TimeoutError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if not as_json:
            click.echo("", err=True)
    click.echo(json.dumps(summary, indent=2) if as_json else format_realtime_summary(summary))
    sys.exit(0 if summary.get("ok") else 1)


@simulate.command("conditional")
@click.option("--data-dir", default=".relay", show_default=True, type=click.Path(path_type=Path),
              help="data folder of the running `relay up`")
@click.option("--customers", default=2000, show_default=True, type=click.IntRange(min=0),
              help="customers of the conditional campaign")
@click.option("--deadline-in", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="seconds from the notification to ClearanceRequiredBy")
@click.option("--reject-every", default=0, show_default=True, type=click.IntRange(min=0),
              help="every Kth customer also holds a code the fake bonus system rejects, so it must not be "
                   "approved (0: none)")
@click.option("--multi-code-every", default=2, show_default=True, type=click.IntRange(min=0),
              help="every Nth customer holds two promo codes (0: none)")
@click.option("--timezone", default="UTC", show_default=True, envvar="OPTIMOVE_TIMEZONE",
              help="time zone ClearanceRequiredBy is written in; must be the relay's OPTIMOVE_TIMEZONE "
                   "(read from it when set)")
@click.option("--cancel-after", default=None, type=click.FloatRange(min=0),
              help="cancel the campaign (EventTypeID 4) this many seconds after the notification")
@click.option("--cancel-fraction", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              help="with --cancel-after: fraction of the customers cancelled")
@click.option("--campaign-id", type=int, default=None, help="default: a random one")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds to keep watching after the deadline (late reports and grants count)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def conditional(data_dir: Path, customers: int, deadline_in: float, reject_every: int, multi_code_every: int,
                timezone: str, cancel_after: float | None, cancel_fraction: float, campaign_id: int | None,
                timeout: float, as_json: bool) -> None:
    """Play a conditional campaign (flow 4, EventTypeID 5) at the relay and check its approvals.

    The relay must grant each customer's promo codes and report each customer with
    UpdateCustomerPromotionStatus before ClearanceRequiredBy. The run fails when a customer that
    could be granted is not approved in time, anything is approved or granted after the deadline,
    a customer is approved without its grants, a report call exceeds 10,000 customers or the
    relay exceeds Optimove's rate limit; with --cancel-after, also when a cancelled customer's
    grant is not revoked, or revoked twice.
    """
    from simulator.conditional_driver import format_conditional_summary, run_conditional

    info = _up_info(data_dir)
    admin_url = info["simulator"].get("bonus_admin_url")
    if not admin_url:
        raise click.ClickException("the running simulator has no fake bonus system; restart `relay up`")
    bar = None if as_json else click.progressbar(length=1000, label="approving", file=sys.stderr)

    def progress(fraction: float, _status: dict) -> None:
        if bar is not None:
            bar.update(max(0, int(fraction * 1000) - bar.pos))

    kwargs = dict(customers=customers, deadline_in=deadline_in, campaign_id=campaign_id,
                  multi_code_every=multi_code_every, reject_every=reject_every, timezone=timezone,
                  timeout=timeout, progress=progress, cancel_after=cancel_after, cancel_customers=cancel_fraction)
    try:
        if bar is not None:
            with bar:
                summary = run_conditional(info["listener_url"], info["simulator"]["optimove_url"], admin_url,
                                          **kwargs)
        else:
            summary = run_conditional(info["listener_url"], info["simulator"]["optimove_url"], admin_url, **kwargs)
    except (TimeoutError, RuntimeError, ValueError) as exc:  # ValueError: e.g. an unknown --timezone
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary, indent=2) if as_json else format_conditional_summary(summary))
    sys.exit(0 if summary.get("ok") else 1)


@simulate.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the fake Optimove, bonus system and send service (options of `python -m simulator serve`)."""
    from simulator.__main__ import main as sim_main

    sys.exit(sim_main(["serve", *ctx.args]))
