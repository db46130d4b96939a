"""Basic auth of the operator pages (`/admin`) and the status API (`/api/`): one check for both.

The user is `RELAY_ADMIN_USER`, the password `RELAY_ADMIN_PASSWORD`; without a password nobody gets in.
"""
from __future__ import annotations

import hmac
from typing import Callable

from flask import Response, request

from web.context import runtime


def admin_authorized() -> bool:
    """Whether the request carries the admin credentials (both compared in constant time, neither short-cut)."""
    settings = runtime().settings
    auth = request.authorization
    return (auth is not None and settings.admin_password is not None
            and hmac.compare_digest((auth.username or "").encode(), settings.admin_user.encode())
            & hmac.compare_digest((auth.password or "").encode(), settings.admin_password.get().encode()))


def require_admin(refusal: Callable[[], Response]) -> Response | None:
    """None for the admin; otherwise `refusal()` turned into a 401 that asks for basic auth (a blueprint's
    `before_request` returns it)."""
    if admin_authorized():
        return None
    response = refusal()
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="relay", charset="UTF-8"'
    return response
