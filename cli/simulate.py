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
@click.option("--channels", default="504,505,506", show_default=True, help="comma-separated channel ids")
@click.option("--customers", default=2000, show_default=True, help="customers per channel")
@click.option("--overlap", default=0.5, show_default=True, help="fraction shared by consecutive channels")
@click.option("--multi-code-every", default=2, show_default=True,
              help="every Nth customer holds two promo codes (0: none)")
@click.option("--campaign-id", type=int, default=None, help="default: a random one")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for the relay")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def campaign(data_dir: Path, channels: str, customers: int, overlap: float, multi_code_every: int,
             campaign_id: int | None, timeout: float, as_json: bool) -> None:
    """Create a multi-channel campaign, fire its notifications at the relay, wait, and summarise."""
    from simulator.driver import format_summary, run_campaign

    if not 0 <= overlap < 1:
        raise click.BadParameter("must be in [0, 1)", param_hint="--overlap")
    try:
        channel_ids = tuple(int(c) for c in channels.split(",") if c.strip())
    except ValueError:
        raise click.BadParameter("comma-separated integers", param_hint="--channels") from None
    info = _up_info(data_dir)
    sim = info["simulator"]
    bar = None if as_json else click.progressbar(length=1000, label="granting", file=sys.stderr)

    def progress(fraction: float, _status: dict) -> None:
        if bar is not None:
            bar.update(max(0, int(fraction * 1000) - bar.pos))

    kwargs = dict(
        listener_url=info["listener_url"], optimove_url=sim["optimove_url"],
        bonus_admin_url=sim["bonus_admin_url"], status_url=None,
        admin_auth=(info["admin_user"], info["admin_password"]), channels=channel_ids,
        customers_per_channel=customers, overlap=overlap, multi_code_every=multi_code_every,
        campaign_id=campaign_id, timeout=timeout, progress=progress)
    kwargs["status_url"] = info["url"] + "/api/campaigns/{campaign_id}"
    try:
        if bar is not None:
            with bar:
                summary = run_campaign(**kwargs)
        else:
            summary = run_campaign(**kwargs)
    except (TimeoutError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    sys.exit(0 if summary.get("ok") else 1)


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


@simulate.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the fake Optimove, bonus system and send service (options of `python -m simulator serve`)."""
    from simulator.__main__ import main as sim_main

    sys.exit(sim_main(["serve", *ctx.args]))
