"""Command line: ``python -m simulator serve ...`` and ``python -m simulator drive ...``."""

from __future__ import annotations

import argparse
import os
import sys

from simulator import driver, server


def _rate_limit(text: str) -> tuple[int, float]:
    """Parse ``50/10s`` or ``50/10`` into (limit, window_seconds)."""
    try:
        limit, window = text.lower().rstrip("s").split("/")
        return int(limit), float(window)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate limit must look like 50/10s, got {text!r}") from None


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
    drive.add_argument("--listener-url", required=True, help="includes ?token=...")
    drive.add_argument("--optimove-url", required=True)
    drive.add_argument("--bonus-admin-url", required=True)
    drive.add_argument("--status-url", required=True, help="the relay's /api/campaigns/<id> prefix")
    drive.add_argument("--admin-user", required=True)
    drive.add_argument("--admin-password", required=True)
    drive.add_argument("--channels", type=lambda s: tuple(int(c) for c in s.split(",")),
                       default=(504, 505, 506))
    drive.add_argument("--customers-per-channel", type=int, default=1000)
    drive.add_argument("--overlap", type=float, default=0.5)
    drive.add_argument("--campaign-id", type=int)
    drive.add_argument("--timeout", type=float, default=120)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
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
    summary = driver.run_campaign(
        args.listener_url, args.optimove_url, args.bonus_admin_url, args.status_url,
        admin_auth=(args.admin_user, args.admin_password), channels=args.channels,
        customers_per_channel=args.customers_per_channel, overlap=args.overlap,
        campaign_id=args.campaign_id, timeout=args.timeout,
        progress=lambda fraction, _status: print(f"  {fraction:6.1%}", flush=True))
    print(driver.format_summary(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
