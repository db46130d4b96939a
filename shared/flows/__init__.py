"""Flows: each module registers its handlers and paged flows when imported."""
from shared.flows import inbox, ledger, scheduled  # noqa: F401  (registration on import)
