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
    """The simulator: fake Optimove and bonus system, and a driver that plays Optimove."""


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


@simulate.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the fake Optimove and fake bonus system (same options as `python -m simulator serve`)."""
    from simulator.__main__ import main as sim_main

    sys.exit(sim_main(["serve", *ctx.args]))
