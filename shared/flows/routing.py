"""Which flow handles a notification: one table by (event type, channel role), filled here, once.

    13 + bonus -> flow 3 (scheduled_bonus)     13 + send -> flow 1 (scheduled_send)
    11 + bonus -> flow 5 (realtime_bonus)      11 + send -> flow 2 (realtime_send)
     5         -> flow 4 (conditional)          4        -> cancellation (cancel)

A second registration of a route is an error when this module is imported, never a silent
overwrite. Routes of flows not built yet answer with a reason (the notification is `ignored`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from shared.flows import cancel, conditional, realtime_bonus, realtime_send, scheduled_bonus, scheduled_send
from shared.flows.base import Flow

CHANNEL_EVENTS = (11, 13)  # event types whose flow depends on the channel's role


class RouteConflict(Exception):
    """Two flows registered for the same route."""


@dataclass(frozen=True)
class Route:
    """An event type, and for channel events the role of the notification's channel."""

    event_type: int
    role: str | None = None

    def __str__(self) -> str:
        return f"EventTypeID {self.event_type}" + (f" on a {self.role} channel" if self.role else "")


class Router:
    """The routing table."""

    def __init__(self) -> None:
        self._flows: dict[Route, Flow] = {}
        self._planned: dict[Route, str] = {}

    def add(self, event_type: int, role: str | None, flow: Flow) -> None:
        """Route `event_type` (on channels of `role`) to `flow`; a route already taken raises `RouteConflict`."""
        route = Route(event_type, role)
        taken = self._flows.get(route)
        if taken is not None:
            raise RouteConflict(f"{route} is already routed to {taken.name}; cannot route it to {flow.name}")
        if any(f.name == flow.name and f is not flow for f in self._flows.values()):
            raise RouteConflict(f"two different flows are named {flow.name!r}")
        self._flows[route] = flow

    def plan(self, event_type: int, role: str | None, what: str) -> None:
        """Name the flow that will take a route that has none yet (for the `ignored` reason)."""
        self._planned[Route(event_type, role)] = what

    def route(self, event_type: int, channel_id: int | None, settings) -> Route:
        """The route of a notification: channel events carry their channel's role."""
        return Route(event_type, settings.channels.role(channel_id) if event_type in CHANNEL_EVENTS else None)

    def flow_for(self, route: Route) -> Flow | None:
        """The flow of `route`, or None."""
        return self._flows.get(route)

    def unrouted_reason(self, route: Route) -> str:
        """Why a notification on `route` is not processed."""
        planned = self._planned.get(route)
        return f"{route}: {planned} is not built yet" if planned else f"no flow handles {route}"

    def flows(self) -> Iterator[Flow]:
        """Every routed flow, once."""
        yield from {f.name: f for f in self._flows.values()}.values()


ROUTER = Router()
ROUTER.add(13, "bonus", scheduled_bonus.FLOW)
ROUTER.add(13, "send", scheduled_send.FLOW)
ROUTER.add(11, "bonus", realtime_bonus.FLOW)
ROUTER.add(11, "send", realtime_send.FLOW)
ROUTER.add(5, None, conditional.FLOW)
ROUTER.add(4, None, cancel.FLOW)

FLOWS: dict[str, Flow] = {flow.name: flow for flow in ROUTER.flows()}
