"""What every command starts with: the settings (a clear error when they are wrong), the warehouse with the
schema this code needs, and torch's thread count. Shared by ``main`` and the commands registered from other
modules.

Only ``db upgrade`` (and the embedded server, which this installation owns) applies migrations: on a configured
warehouse a command runs as whatever login it is given, typically a member of ``odyssey_pipeline`` without
CREATE, and refuses to start (exit 2) when the schema is not current.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from odyssey_batch.cli.output import err_console
from odyssey_batch.redaction import remember_settings_secrets
from odyssey_batch.settings import Settings, load_settings


def cli_settings() -> Settings:
    try:
        settings = load_settings()
    except (ValueError, FileNotFoundError) as exc:
        err_console.print(f"[red]configuration error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    remember_settings_secrets(settings)
    return settings


def open_warehouse() -> tuple[Settings, str]:
    """The settings and the warehouse URL, its schema current: migrated when it is the embedded server, else
    checked (exit 2 with what to do when it is behind)."""
    from odyssey_batch.warehouse import SchemaNotCurrent, database_url, prepare

    settings = cli_settings()
    url = database_url(settings)
    try:
        prepare(url, owner=settings.embedded)
    except SchemaNotCurrent as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    return settings, url


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, when the command was given ``--threads``."""
    if threads:
        import torch

        torch.set_num_threads(threads)
