"""Command line: ``python -m simulator serve ...`` and ``python -m simulator drive ...``."""

from __future__ import annotations

import argparse
import os
import sys

from simulator import driver, roles, server


def _rate_limit(text: str) -> tuple[int, float]:
    """Parse ``50/10s`` or ``50/10`` into (limit, window_seconds)."""
    try:
        limit, window = text.lower().rstrip("s").split("/")
        return int(limit), float(window)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate limit must look like 50/10s, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    """Parse ``504,505`` into (504, 505)."""
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for both sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the fake Optimove, bonus system and send service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--optimove-port", type=int, default=0, help="0 picks a free port")
    serve.add_argument("--bonus-port", type=int, default=0, help="0 picks a free port")
    serve.add_argument("--send-port", type=int, default=0, help="0 picks a free port")
    serve.add_argument("--api-key", default=os.environ.get("SIMULATOR_API_KEY"),
                       required=not os.environ.get("SIMULATOR_API_KEY"),
                       help="API key the fake Optimove accepts (default: $SIMULATOR_API_KEY)")
    serve.add_argument("--rate-limit", type=_rate_limit, default=(50, 10.0), help="e.g. 50/10s")
    serve.add_argument("--failure-rate", type=float, default=0.0)
    serve.add_argument("--timeout-rate", type=float, default=0.0)
    serve.add_argument("--drop-after-apply-rate", type=float, default=0.0)
    serve.add_argument("--item-retry-rate", type=float, default=0.0)
    serve.add_argument("--latency-ms", type=float, default=0)
    serve.add_argument("--timeout-sleep-s", type=float, default=15.0)
    serve.add_argument("--reject-code", action="append", default=[], dest="reject_codes")
    serve.add_argument("--reject-template-id", type=int, action="append", default=[],
                       dest="reject_template_ids", help="templates the fake send service rejects")
    serve.add_argument("--seed", type=int, default=None)
    serve.add_argument("--ready-file", help="write the URLs here as JSON once the servers listen")

    drive = commands.add_parser("drive", help="play Optimove against a running relay")
    drive.add_argument("--role", choices=driver.ROLES, default="bonus",
                       help="bonus: grant promo codes (flow 3); send: pre-scheduled sends (flow 1)")
    drive.add_argument("--listener-url", required=True, help="includes ?token=...")
    drive.add_argument("--optimove-url", required=True)
    drive.add_argument("--bonus-admin-url", help="required with --role bonus")
    drive.add_argument("--send-admin-url", help="required with --role send")
    drive.add_argument("--status-url", help="the relay's /api/campaigns/<id> prefix (required with --role bonus)")
    drive.add_argument("--admin-user")
    drive.add_argument("--admin-password")
    drive.add_argument("--channels", type=_ints, help="default: 504,505,506 (bonus), 610 (send)")
    drive.add_argument("--customers-per-channel", type=int, default=1000)
    drive.add_argument("--overlap", type=float, default=None, help="default: 0.5 (bonus), 0 (send)")
    drive.add_argument("--campaign-id", type=int)
    drive.add_argument("--timeout", type=float, default=120,
                       help="seconds to wait (send: after the last send falls due)")
    drive.add_argument("--spread", type=float, default=60.0, help="send: seconds over which sends fall due")
    drive.add_argument("--due-now", type=float, default=0.5, help="send: fraction due at once")
    drive.add_argument("--templates", type=_ints, default=(14, 15, 16), help="send: template ids")
    drive.add_argument("--attributes", type=lambda s: tuple(a for a in s.split(",") if a),
                       default=("Email", "Country"), help="send: attribute names the relay requests")
    drive.add_argument("--timezone", default="UTC", help="send: the relay's OPTIMOVE_TIMEZONE")
    drive.add_argument("--attribute-form", choices=("list", "string", "mixed"), default="mixed")
    drive.add_argument("--no-seconds", action="store_true", help="send: ScheduledTime without seconds")
    return parser


def _drive(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Run the campaign the ``drive`` arguments describe and return its summary."""

    def progress(fraction: float, _status: dict) -> None:
        print(f"  {fraction:6.1%}", flush=True)

    auth = (args.admin_user, args.admin_password) if args.admin_user else None
    if args.role == "send":
        if not args.send_admin_url:
            parser.error("--role send needs --send-admin-url")
        return roles.run_for_role(
            "send", args.listener_url, args.optimove_url, args.send_admin_url, args.status_url, auth,
            channels=args.channels or (610,), customers_per_channel=args.customers_per_channel,
            overlap=args.overlap or 0.0, templates=args.templates, attributes=args.attributes,
            spread=args.spread, due_now_fraction=args.due_now, timezone=args.timezone,
            with_seconds=not args.no_seconds, attribute_form=args.attribute_form,
            campaign_id=args.campaign_id, timeout=args.timeout, progress=progress)
    if not (args.bonus_admin_url and args.status_url and auth and args.admin_password):
        parser.error("--role bonus needs --bonus-admin-url, --status-url, --admin-user and --admin-password")
    return driver.run_campaign(
        args.listener_url, args.optimove_url, args.bonus_admin_url, args.status_url,
        admin_auth=auth, channels=args.channels or (504, 505, 506),
        customers_per_channel=args.customers_per_channel,
        overlap=0.5 if args.overlap is None else args.overlap,
        campaign_id=args.campaign_id, timeout=args.timeout, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        server.serve(
            args.optimove_port, args.bonus_port, args.api_key, host=args.host,
            ready_file=args.ready_file, rate_limit=args.rate_limit,
            failure_rate=args.failure_rate, timeout_rate=args.timeout_rate,
            drop_after_apply_rate=args.drop_after_apply_rate, item_retry_rate=args.item_retry_rate,
            latency_ms=args.latency_ms, timeout_sleep_s=args.timeout_sleep_s,
            reject_codes=tuple(args.reject_codes), seed=args.seed, send_port=args.send_port,
            send_faults={"reject_template_ids": tuple(args.reject_template_ids), "seed": args.seed})
        return 0
    summary = _drive(args, parser)
    print(roles.format_for_role(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
