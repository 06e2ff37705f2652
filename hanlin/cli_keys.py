"""`hanlin keys create|list|revoke` and `hanlin usage`: API keys and metered usage in the metering database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hanlin.errors import HanlinError
from hanlin.metering import STATUSES, KeyInfo, MeteringStore, UsageTotal
from hanlin.metering.store import GROUPINGS

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", envvar="HANLIN_DB", show_envvar=True,
        help="Metering database: a SQLite path, sqlite:///path or postgresql://user@host/db "
        "(default: $HANLIN_HOME/hanlin.db).",
    ),
]
JsonOutput = Annotated[
    bool, typer.Option("--json", envvar="HANLIN_JSON", show_envvar=True, help="Print JSON instead of text.")
]
UsageBy = Annotated[
    str, typer.Option("--by", envvar="HANLIN_USAGE_BY", show_envvar=True, help="Group by key, model or day (UTC).")
]
KeyName = Annotated[str, typer.Option("--name", help="Who or what uses the key; unique among active keys.")]
QuotaTokens = Annotated[int | None, typer.Option("--quota-tokens", help="Most prompt + completion tokens it may use.")]

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


@contextmanager
def open_store(db: str | None) -> Iterator[MeteringStore]:
    """The store, closed afterwards; a database failure mid-command becomes a one-line HanlinError."""
    with MeteringStore.open(db) as store:
        try:
            yield store
        except Exception as error:
            if isinstance(error, HanlinError) or not store.is_database_error(error):
                raise
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HanlinError(f"database error ({store.url}): {detail}") from None


def register(app: typer.Typer) -> None:
    """Add `keys` and `usage` to the main app."""
    app.add_typer(keys_app, name="keys")
    app.command("usage")(usage)


@keys_app.command("create")
def create(
    name: KeyName,
    quota_tokens: QuotaTokens = None,
    db: DbOption = None,
    json_output: JsonOutput = False,
) -> None:
    """Create an API key and print it once."""
    with open_store(db) as store:
        plaintext, key = store.create_key(name, quota_tokens)
    if json_output:
        print(json.dumps({"key": plaintext, **key_json(key)}))
        return
    quota = f"a quota of {key.quota_tokens:,} tokens" if key.quota_tokens is not None else "no quota"
    stderr.print(f"Created key [bold]{escape(key.name)}[/] ({key.prefix}…) with {quota}.")
    print(plaintext)
    stderr.print("[yellow]Store it now: it will not be shown again.[/]")


@keys_app.command("list")
def list_keys(db: DbOption = None, json_output: JsonOutput = False) -> None:
    """List API keys (names and prefixes only: the keys themselves are not stored)."""
    with open_store(db) as store:
        keys = store.list_keys()
    if json_output:
        print(json.dumps([key_json(key) for key in keys]))
        return
    if not keys:
        stderr.print("No API keys yet; create one with: hanlin keys create --name NAME")
        return
    table = Table(title_justify="left")
    for column in ("name", "prefix", "created (UTC)", "quota", "used", "status"):
        table.add_column(column, justify="right" if column in ("quota", "used") else "left")
    colors = {"active": "green", "revoked": "dim", "exhausted": "yellow"}
    for key in keys:
        table.add_row(
            escape(key.name), key.prefix, f"{key.created_at:%Y-%m-%d %H:%M}",
            "—" if key.quota_tokens is None else f"{key.quota_tokens:,}", f"{key.used_tokens:,}",
            f"[{colors[key.status]}]{key.status}[/]",
        )
    output_console().print(table)


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The key's name or prefix (as `hanlin keys list` shows).")],
    db: DbOption = None,
) -> None:
    """Revoke an API key: requests using it are refused from now on."""
    with open_store(db) as store:
        key = store.revoke_key(name)
    stderr.print(f"Revoked key [bold]{escape(key.name)}[/] ({key.prefix}…).")


def usage(
    by: UsageBy = "key",
    db: DbOption = None,
    json_output: JsonOutput = False,
) -> None:
    """Show metered usage: requests and tokens per key, model or day."""
    if by not in GROUPINGS:
        raise HanlinError(f"--by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    with open_store(db) as store:
        totals = store.usage_totals(by)
    if json_output:
        print(json.dumps([vars(total) for total in totals]))
        return
    if not totals:
        stderr.print("No usage recorded yet.")
        return
    statuses = [(s, s) for s in STATUSES if any(getattr(t, s) for t in totals)]  # a column per status seen
    grand = sum_totals(totals) if len(totals) > 1 else None
    console = output_console()
    table = usage_table(by, totals, grand, TOKEN_COLUMNS + statuses)
    if console.measure(table, options=console.options.update_width(10_000)).maximum <= console.width:
        console.print(table)
    else:  # too wide for this terminal: tokens, then statuses
        console.print(usage_table(by, totals, grand, TOKEN_COLUMNS))
        console.print(usage_table(by, totals, grand, statuses))


TOKEN_COLUMNS = [
    ("requests", "requests"),
    ("prompt", "prompt_tokens"),
    ("cached", "cached_tokens"),
    ("completion", "completion_tokens"),
]


def usage_table(by: str, totals: list[UsageTotal], grand: UsageTotal | None, columns: list[tuple[str, str]]) -> Table:
    """`by` then one right-aligned column per (header, UsageTotal attribute), and a total row when given."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column(by, overflow="fold")
    for header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for total in totals:
        table.add_row(escape(total.group), *(f"{getattr(total, attr):,}" for _, attr in columns))
    if grand is not None:
        table.add_section()
        table.add_row("total", *(f"{getattr(grand, attr):,}" for _, attr in columns), style="bold")
    return table


def output_console() -> Console:
    """stdout; piped output gets room for every column rather than the 80 columns assumed without a terminal."""
    return stdout if stdout.is_terminal else Console(highlight=False, width=max(stdout.width, 200))


def sum_totals(totals: list[UsageTotal]) -> UsageTotal:
    sums: dict[str, Any] = {name: sum(getattr(t, name) for t in totals) for name in vars(totals[0]) if name != "group"}
    return UsageTotal(group="total", **sums)


def key_json(key: KeyInfo) -> dict[str, Any]:
    return {
        "id": key.id, "name": key.name, "prefix": key.prefix, "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "quota_tokens": key.quota_tokens, "used_tokens": key.used_tokens, "status": key.status,
    }
