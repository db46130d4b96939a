"""`relay templates`: Optimove setup commands. They need only the Optimove settings, never the database.

The generic parts (`optimove_client`, `run_sync`, `run_list`) take a `RecordKind`, so another
setup command (promotions) is a click group calling them with its own kind and parameters.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, NoReturn

import click

from shared.optimove.setup import (TEMPLATES, RecordFileError, RecordKind, SyncFailed, batches, call_path,
                                   list_records, load_records, sync_records)
from shared.settings import Settings, SettingsError

OPTIMOVE_SETTINGS = ("optimove_api_url", "optimove_api_key")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `relay: message` to stderr and exit with `code`."""
    click.echo(f"relay: {message}", err=True)
    sys.exit(code)


def client_for(settings: Settings):
    """An Optimove client for `settings`, rate limited (Redis-shared when REDIS_URL is set)."""
    from shared.optimove.client import OptimoveClient
    from shared.optimove.limiter import limiter_from_settings

    return OptimoveClient.from_settings(settings, limiter_from_settings(settings))


def optimove_client():
    """An Optimove client from the environment (`client_for`); exit 2 if the Optimove settings are unset."""
    try:
        settings = Settings.from_env().require(*OPTIMOVE_SETTINGS)
    except SettingsError as exc:
        fail(str(exc), 2)
    return client_for(settings)


def redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is a dependency
        return ()
    return (RedisError,)


def _lines(batch) -> str:
    first, last = batch[0].line, batch[-1].line
    return f"line {first}" if first == last else f"lines {first}-{last}"


def print_plan(kind: RecordKind, records, params: Mapping[str, Any]) -> None:
    """The dry-run output: which calls would go out, with how many records each."""
    plan = batches(records, kind.batch_size)
    click.echo(f"dry run: {kind.count(len(records))} would be sent in {len(plan)} call(s) of at most "
               f"{kind.batch_size}: {call_path(kind, params)}")
    for number, batch in enumerate(plan, start=1):
        click.echo(f"  call {number} of {len(plan)}: {kind.count(len(batch))} "
                   f"({kind.id_field} {batch[0].id} … {batch[-1].id}, file {_lines(batch)})")
    click.echo("nothing was sent")


def run_sync(kind: RecordKind, path: Path, params: Mapping[str, Any], target: str, dry_run: bool) -> None:
    """Validate `path` completely, then send it in batches (or print the plan); exits non-zero on failure."""
    try:
        records = load_records(path, kind)
    except RecordFileError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        fail(f"{path}: {len(exc.problems)} problem(s); nothing was sent", 2)
    if dry_run:
        print_plan(kind, records, params)
        return
    client = optimove_client()
    try:
        result = sync_records(client, kind, records, params, progress=lambda p: click.echo(str(p), err=True))
    except SyncFailed as exc:
        if isinstance(exc.error, redis_errors()):
            click.echo("relay: REDIS_URL is set, so the Optimove rate limit is shared through that Redis, which "
                       "failed; start it, or unset REDIS_URL to limit this command in-process only", err=True)
        fail(str(exc))
    finally:
        client.close()
    click.echo(f"synced {kind.count(result.sent)} to {target} in {result.calls} call(s) ({kind.add_function})")


def run_list(kind: RecordKind, params: Mapping[str, Any], target: str, as_json: bool) -> None:
    """Print the stored records as a table (or the JSON Optimove returned)."""
    from shared.optimove.client import OptimoveError

    client = optimove_client()
    try:
        rows = list_records(client, kind, params)
    except OptimoveError as exc:
        fail(f"{kind.list_function} failed: {exc.reason}")
    except redis_errors() as exc:
        fail(f"REDIS_URL: the shared rate limit is unreachable ({type(exc).__name__}: {exc})")
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    print_table(kind, rows)
    click.echo(f"{kind.count(len(rows))} on {target}")


def print_table(kind: RecordKind, rows: list[dict]) -> None:
    """Two columns, the id right-aligned when ids are integers."""
    if not rows:
        return
    pairs = [tuple("" if v is None else str(v) for v in kind.fields_of(row)) for row in rows]
    width = max(len(kind.id_field), *(len(i) for i, _ in pairs))
    align = ">" if kind.int_ids else "<"
    click.echo(f"{kind.id_field:{align}{width}}  {kind.name_field}")
    for record_id, name in pairs:
        click.echo(f"{record_id:{align}{width}}  {name}")


@click.group()
def templates() -> None:
    """Optimove channel templates (setup step): sync a file of templates to a channel, list them.

    Needs OPTIMOVE_API_URL and OPTIMOVE_API_KEY only (no database). Calls respect
    OPTIMOVE_RATE_LIMIT, shared with the workers through Redis when REDIS_URL is set.
    """


@templates.command("sync")
@click.option("--channel", "channel_id", type=click.IntRange(min=1), required=True, help="Optimove ChannelID")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="templates.csv (header TemplateID,TemplateName) or templates.json (array of objects)")
@click.option("--dry-run", is_flag=True, help="validate and print the calls that would be made; send nothing")
def templates_sync(channel_id: int, path: Path, dry_run: bool) -> None:
    """Validate every line of FILE, then add its templates to a channel (AddChannelTemplates, 100 per call).

    Any bad line (id not a positive integer, duplicate id, empty name, missing column) is
    printed with its line number and nothing is sent (exit 2). Re-running is safe: templates
    are stored by TemplateID.
    """
    run_sync(TEMPLATES, path, {"ChannelID": channel_id}, f"channel {channel_id}", dry_run)


@templates.command("list")
@click.option("--channel", "channel_id", type=click.IntRange(min=1), required=True, help="Optimove ChannelID")
@click.option("--json", "as_json", is_flag=True, help="print the JSON array Optimove returned")
def templates_list(channel_id: int, as_json: bool) -> None:
    """The templates Optimove has for a channel (GetChannelTemplates)."""
    run_list(TEMPLATES, {"ChannelID": channel_id}, f"channel {channel_id}", as_json)
