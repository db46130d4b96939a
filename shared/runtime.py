"""Per-process resources built from the settings: engine, Redis, Optimove client, bonus and send adapters.

Created lazily and re-created after a fork, so a Celery prefork child never shares its parent's
sockets.
"""
from __future__ import annotations

import os
import weakref
from functools import cached_property

from shared.settings import Settings


class Runtime:
    """The resources one process needs, built on first use."""

    def __init__(self, settings: Settings, pre_ping: bool = True):
        self.settings = settings
        self.pre_ping = pre_ping
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: ref() and ref()._forget())

    def _forget(self) -> None:
        """Drop every resource built in the parent: a child opens its own connections."""
        for name in ("engine", "redis", "optimove", "bonus", "send", "limiter"):
            self.__dict__.pop(name, None)

    @cached_property
    def engine(self):
        """The SQLAlchemy engine of this process."""
        from shared.db import make_engine

        self.settings.require("database_url")
        return make_engine(self.settings.database_url, pre_ping=self.pre_ping)

    @cached_property
    def redis(self):
        """A Redis client for the rate limiter (the Celery broker too, unless `BROKER_URL` names another)."""
        import redis

        self.settings.require("redis_url")
        return redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=3)

    @cached_property
    def limiter(self):
        """The Optimove rate limiter shared by every worker through Redis."""
        from shared.optimove.limiter import RateLimiter

        self.settings.require("optimove_api_key")
        return RateLimiter(self.redis, self.settings.optimove_api_key, self.settings.optimove_rate_limit)

    @cached_property
    def optimove(self):
        """The Optimove API client, rate limited."""
        from shared.optimove.client import OptimoveClient

        s = self.settings.require("optimove_api_url", "optimove_api_key")
        return OptimoveClient(s.optimove_api_url, s.optimove_api_key, timeout=s.optimove_timeout,
                              limiter=self.limiter)

    @cached_property
    def bonus(self):
        """The configured bonus adapter."""
        from shared.adapters.bonus import load_bonus_adapter

        return load_bonus_adapter(self.settings)

    @cached_property
    def send(self):
        """The configured send adapter."""
        from shared.adapters.send import load_send_adapter

        return load_send_adapter(self.settings)
