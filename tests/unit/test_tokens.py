"""Listener token checks."""
from shared.settings import Secret
from web.listener import token_ok

TOKENS = (Secret("current-token-0123456789"), Secret("next-token-0123456789abc"))


def test_any_configured_token_accepted():
    assert token_ok("current-token-0123456789", TOKENS)
    assert token_ok("next-token-0123456789abc", TOKENS)


def test_wrong_missing_or_unconfigured_refused():
    assert not token_ok("current-token-012345678", TOKENS)
    assert not token_ok("current-token-0123456789x", TOKENS)
    assert not token_ok("", TOKENS)
    assert not token_ok(None, TOKENS)
    assert not token_ok("current-token-0123456789", ())
    assert not token_ok("ünïcode-token-0123456789", TOKENS)
