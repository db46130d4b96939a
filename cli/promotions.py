"""`relay promotions`: sync promo codes to Optimove, list and delete them. Optimove settings only, no database.

`sync` and `list` are the generic setup commands of `cli.optimove_setup` with the `PROMOTIONS` kind.
"""
from __future__ import annotations

from pathlib import Path

import click

from cli.optimove_setup import fail, optimove_client, run_list, run_sync
from shared.optimove.setup import MAX_BATCH, PROMOTIONS

TARGET = "Optimove"
DELETE_FUNCTION = "DeletePromotions"


@click.group()
def promotions() -> None:
    """Optimove promotions (setup step): sync a file of promo codes, list them, delete some.

    Needs OPTIMOVE_API_URL and OPTIMOVE_API_KEY only (no database). Calls respect
    OPTIMOVE_RATE_LIMIT, shared with the workers through Redis when REDIS_URL is set.
    """


@promotions.command("sync")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="promos.csv (header PromoCode,PromotionName) or promos.json (array of objects)")
@click.option("--dry-run", is_flag=True, help="validate and print the calls that would be made; send nothing")
def promotions_sync(path: Path, dry_run: bool) -> None:
    """Validate every line of FILE, then add its promotions to Optimove (AddPromotions, 100 per call).

    Any bad line (empty code, duplicate code, empty name, missing column) is printed with its
    line number and nothing is sent (exit 2). Re-running is safe: Optimove stores promotions by
    PromoCode and overwrites the name of an existing one.
    """
    run_sync(PROMOTIONS, path, {}, TARGET, dry_run)


@promotions.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the JSON array Optimove returned")
def promotions_list(as_json: bool) -> None:
    """The promotions Optimove has (GetPromotions)."""
    run_list(PROMOTIONS, {}, TARGET, as_json)


@promotions.command("delete")
@click.argument("codes", nargs=-1, required=True)
def promotions_delete(codes: tuple[str, ...]) -> None:
    """Delete the promotions with these promo CODES from Optimove (DeletePromotions, 100 per call)."""
    from shared.optimove.client import OptimoveError
    from shared.optimove.setup import call_with_retry

    wanted = list(dict.fromkeys(code.strip() for code in codes))
    if "" in wanted:
        fail("a promo code is empty; nothing was deleted", 2)
    plan = [wanted[i:i + MAX_BATCH] for i in range(0, len(wanted), MAX_BATCH)]
    client = optimove_client()
    deleted = 0
    try:
        for number, batch in enumerate(plan, start=1):
            body = [{PROMOTIONS.id_field: code} for code in batch]
            try:
                call_with_retry(lambda: client.post(PROMOTIONS.category, DELETE_FUNCTION, body))
            except OptimoveError as exc:
                fail(f"{DELETE_FUNCTION} call {number} of {len(plan)} failed: {exc.reason}; "
                     f"{PROMOTIONS.count(deleted)} were deleted before it")
            except Exception as exc:  # e.g. the Redis of the shared rate limit is down
                fail(f"{DELETE_FUNCTION} call {number} of {len(plan)} failed: {type(exc).__name__}: {exc}; "
                     f"{PROMOTIONS.count(deleted)} were deleted before it")
            deleted += len(batch)
    finally:
        client.close()
    click.echo(f"deleted {PROMOTIONS.count(deleted)} from {TARGET} in {len(plan)} call(s) ({DELETE_FUNCTION}): "
               + ", ".join(wanted))
