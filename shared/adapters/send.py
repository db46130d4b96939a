"""Send adapters: ask the operator's marketing platform to send a template to customers.

Every send carries a stable idempotency key, so a retry after a crash is safe for a platform
that honours it. Adapters answer one `SendResult` per item: `sent`, `rejected` (permanent, with
a reason) or `retry`. Built-ins: `http` (generic JSON over HTTP), `log` (logs, sends nothing)
and `fake` (in memory); others come from the `relay.send_adapters` entry-point group.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from shared.adapters.http import FakeAdapter, HttpAdapter, ItemResult, load_adapter

ENTRY_POINT_GROUP = "relay.send_adapters"
STATUSES = ("sent", "rejected", "retry")

SendResult = ItemResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendItem:
    """One template to send to one customer (`notification_id` set for real-time sends)."""

    idempotency_key: str
    campaign_id: int
    channel_id: int | None
    template_id: int | None
    customer_id: str
    attributes: dict[str, Any]
    promo_codes: list[str]
    scheduled_time: str | None
    source: str
    notification_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The item as the JSON object the platform receives."""
        return {"idempotency_key": self.idempotency_key, "campaign_id": self.campaign_id,
                "channel_id": self.channel_id, "template_id": self.template_id,
                "customer_id": self.customer_id, "attributes": dict(self.attributes),
                "promo_codes": list(self.promo_codes), "scheduled_time": self.scheduled_time,
                "source": self.source, "notification_id": self.notification_id}


class SendAdapter(Protocol):
    """What the send machinery needs from a marketing platform."""

    def send(self, items: list[SendItem]) -> list[SendResult]:
        """Send `items`; one result per item, in order, with the same keys."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


class HttpSendAdapter(HttpAdapter):
    """Generic JSON-over-HTTP marketing platform, in `batch` (`{"sends": [...]}`) or `single` mode."""

    prefix = "send"
    envelope = "sends"
    success = "sent"
    statuses = STATUSES

    def send(self, items: list[SendItem]) -> list[SendResult]:
        """Send `items`: batch mode posts chunks of `batch_size`, single mode one call per item."""
        return self.deliver(items)


class LogSendAdapter:
    """Sends nothing: logs one line per item at INFO and answers `sent` with reference `log-<n>`."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> "LogSendAdapter":
        """A fresh log adapter; `settings` is ignored."""
        return cls()

    def send(self, items: list[SendItem]) -> list[SendResult]:
        """Log each item and answer `sent` for it."""
        results = []
        for item in items:
            with self._lock:
                self.count += 1
                reference = f"log-{self.count}"
            # Attribute values stay out of the log: they may hold e-mail addresses and other personal data.
            log.info("send campaign=%s channel=%s template=%s customer=%s source=%s reference=%s",
                     item.campaign_id, item.channel_id, item.template_id, item.customer_id, item.source,
                     reference)
            results.append(SendResult(item.idempotency_key, "sent", reference))
        return results

    def close(self) -> None:
        """Nothing to release."""


class FakeSendAdapter(FakeAdapter):
    """An in-memory marketing platform for tests (see `FakeAdapter`): `reject_template` refuses a template."""

    success = "sent"
    reject_by = "template_id"

    def reject_template(self, template_id: int | None, reason: str = "rejected by fake") -> None:
        """Reject every future send of `template_id` with `reason`."""
        self.reject(template_id, reason)

    def send(self, items: list[SendItem]) -> list[SendResult]:
        """Apply each item once per idempotency key; repeats answer `sent` with the first reference."""
        return self.deliver(items)


_BUILTINS = {"http": HttpSendAdapter.from_settings, "log": LogSendAdapter.from_settings,
             "fake": FakeSendAdapter.from_settings}


def load_send_adapter(settings) -> SendAdapter:
    """The adapter named by `settings.send_adapter`: a built-in or a `relay.send_adapters` entry point.

    An entry point is a class or factory taking `settings` (a class with `from_settings` is built by it).
    """
    return load_adapter(settings.send_adapter, _BUILTINS, ENTRY_POINT_GROUP, "SEND_ADAPTER", settings)
