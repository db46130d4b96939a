"""Query-string parameters of `/admin` and `/api/`: checked, with a 400 naming the parameter otherwise."""
from __future__ import annotations

import re
from typing import Sequence

from flask import request

from shared.schemas import BIGINT_MAX
from shared.views import LIMIT_DEFAULT, LIMIT_MAX
from web.errors import ApiError

_INTEGER = re.compile(r"[+-]?[0-9]{1,40}")
OFFSET_MAX = 100_000


def _given(name: str) -> str | None:
    value = request.args.get(name)
    return value or None  # empty counts as unset; anything else is taken as it is (" 5" is not 5)


def int_arg(name: str, minimum: int, maximum: int, hint: str = "") -> int | None:
    """The integer `name` between `minimum` and `maximum`, None when absent; 400 otherwise."""
    value = _given(name)
    if value is None:
        return None
    number = int(value) if _INTEGER.fullmatch(value) else None
    if number is None or not minimum <= number <= maximum:
        raise ApiError(400, f"{name}: expected an integer between {minimum} and {maximum}, got {value[:40]!r}{hint}")
    return number


def limit_arg() -> int:
    """`limit`: default 50, clamped to 1..500; 400 when it is not an integer."""
    value = _given("limit")
    if value is None:
        return LIMIT_DEFAULT
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise ApiError(400, f"limit: expected an integer (1 to {LIMIT_MAX}), got {value[:40]!r}")
    digits = value.lstrip("+-").lstrip("0")
    if len(digits) > 6:  # any integer is clamped, however long
        return 1 if value.startswith("-") else LIMIT_MAX
    return max(1, min(LIMIT_MAX, int(value)))


def offset_arg() -> int:
    """`offset`: 0 to 100,000 (deeper pages: `before`)."""
    return int_arg("offset", 0, OFFSET_MAX, "; use before=<id> to page further") or 0


def id_arg(name: str) -> int | None:
    """A row or campaign id (1 to 2**63-1)."""
    return int_arg(name, 1, BIGINT_MAX)


def choice_arg(name: str, allowed: Sequence[str], default: str | None = None) -> str | None:
    """One of `allowed` (`default` when absent); 400 naming the allowed values otherwise."""
    value = _given(name)
    if value is None:
        return default
    if value not in allowed:
        raise ApiError(400, f"{name}: unknown value {value[:40]!r}; allowed: {', '.join(allowed)}",
                       allowed=list(allowed))
    return value


def accept_only(*names: str) -> None:
    """400 naming any query parameter the endpoint does not take (a typo such as `stauts` is not ignored)."""
    unknown = sorted(set(request.args) - set(names))
    if unknown:
        shown = ", ".join(repr(n[:40]) for n in unknown[:5])
        accepted = ", ".join(names) if names else "none"
        raise ApiError(400, f"unknown query parameter {shown}; accepted: {accepted}", accepted=list(names))
