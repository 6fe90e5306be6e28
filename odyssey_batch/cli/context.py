"""What every command starts with: the settings (a clear error when they are wrong), the migrated warehouse,
and torch's thread count. Shared by ``main`` and the commands registered from other modules."""

from __future__ import annotations

import typer

from odyssey_batch.cli.output import err_console
from odyssey_batch.settings import Settings, load_settings


def cli_settings() -> Settings:
    try:
        return load_settings()
    except (ValueError, FileNotFoundError) as exc:
        err_console.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from exc


def open_warehouse() -> tuple[Settings, str]:
    """The settings and the warehouse URL, with every migration applied."""
    from odyssey_batch.warehouse import database_url, upgrade

    settings = cli_settings()
    url = database_url(settings)
    upgrade(url)
    return settings, url


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, when the command was given ``--threads``."""
    if threads:
        import torch

        torch.set_num_threads(threads)
