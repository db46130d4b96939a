"""Error text that is safe to record: trimmed, with every secret replaced by `***`."""
from __future__ import annotations

from typing import Iterable

TEXT_LIMIT = 300


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with each non-empty secret replaced by `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def response_text(response, secrets: Iterable[str], limit: int = TEXT_LIMIT) -> str:
    """The body of an HTTP response, trimmed to `limit` characters and redacted."""
    text = response.text.strip()
    if len(text) > limit:
        text = text[:limit] + "…"
    return redact(text, secrets)
