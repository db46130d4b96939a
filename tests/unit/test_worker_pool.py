"""The real-time worker's thread pool wakes the event loop after each task's ack."""
from __future__ import annotations

import threading

from tests.conftest import poll
from workers.pool import WakingThreadPool


class Hub:
    def __init__(self):
        self.woken = []

    def call_soon(self, callback, *args):
        self.woken.append(callback)


def test_the_loop_is_woken_after_the_callback_that_acks():
    pool = WakingThreadPool(limit=2)
    hub = Hub()
    pool.register_with_event_loop(hub)
    order = []
    acked = threading.Event()

    def ack(result):
        order.append(("ack", result, len(hub.woken)))
        acked.set()

    pool.on_apply(lambda x: x * 2, args=(21,), callback=ack)
    poll(lambda: acked.is_set() and hub.woken, 5, message="task acked and loop woken")
    assert order == [("ack", 42, 0)] and len(hub.woken) == 1
    pool.on_stop()


def test_the_loop_is_woken_even_when_the_callback_fails():
    pool = WakingThreadPool(limit=1)
    hub = Hub()
    pool.register_with_event_loop(hub)

    def broken(result):
        raise RuntimeError("ack failed")

    pool.on_apply(lambda: None, args=(), callback=broken)
    poll(lambda: hub.woken, 5, message="loop woken")
    pool.on_stop()
