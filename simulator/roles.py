"""A campaign of either role: grants (``simulator.driver``) or sends (``simulator.send_driver``)."""
from __future__ import annotations

from simulator.driver import ROLES, format_summary, run_campaign
from simulator.send_driver import format_send_summary, run_send_campaign


def run_for_role(role: str, listener_url: str, optimove_url: str, admin_url: str, status_url: str | None,
                 admin_auth: tuple[str, str], **options) -> dict:
    """Run a campaign of ``role``: ``bonus`` (``run_campaign``; ``admin_url`` is the fake bonus
    system's) or ``send`` (``send_driver.run_send_campaign``; the fake send service's).

    ``options`` are that function's keyword arguments.
    """
    if role == "bonus":
        return run_campaign(listener_url, optimove_url, admin_url, status_url, admin_auth=admin_auth, **options)
    if role == "send":
        return run_send_campaign(listener_url, optimove_url, admin_url, status_url, admin_auth=admin_auth,
                                 **options)
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def format_for_role(summary: dict) -> str:
    """``format_summary`` or, for a send campaign's summary, ``send_driver.format_send_summary``."""
    if summary.get("role") == "send":
        return format_send_summary(summary)
    return format_summary(summary)
