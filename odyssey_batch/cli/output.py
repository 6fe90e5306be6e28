"""How commands talk to people and machines: rich summaries on stdout, progress on stderr, or JSON.

Everything printed through ``console``, ``err_console``, ``table`` and ``emit_json`` goes through
``odyssey_batch.redaction.redact`` first, so no password reaches the screen (``db url`` prints with plain
``print``: the one documented exception).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from odyssey_batch.redaction import redact


class RedactingConsole(Console):
    """A rich console whose text arguments are redacted before rendering (rendering may wrap a line)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


console = RedactingConsole()
err_console = RedactingConsole(stderr=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(redact(json.dumps(data, indent=2, default=str)) + "\n")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    out = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for i, name in enumerate(columns):
        out.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*[f"{v:,}" if isinstance(v, int) else redact(str(v)) for v in row])
    return out


class _Bar:
    """A rich progress display on stderr, shown only when stderr is a terminal."""

    def __init__(self, enabled: bool, *columns: Any):
        self.enabled = enabled and err_console.is_terminal
        self.bar = Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True)

    def __enter__(self) -> Any:
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


class IngestProgress(_Bar):
    """A progress bar over the bytes of the export (compressed size), on stderr."""

    def __init__(self, enabled: bool = True):
        super().__init__(
            enabled,
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[records]:,} resources"),
        )
        self.task: Any = None
        self.records = 0
        self.files_done = 0
        self.total_files = 0

    def start(self, total_bytes: int, total_files: int) -> None:
        self.total_files = total_files
        if self.enabled:
            self.task = self.bar.add_task(f"files 0/{total_files}", total=total_bytes, records=0)

    def advance(self, nbytes: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, nbytes)

    def file_done(self, name: str, records: int) -> None:
        self.records += records
        self.files_done += 1
        if self.task is not None:
            self.bar.update(self.task, description=f"files {self.files_done}/{self.total_files}", records=self.records)

    def phase(self, description: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, description=description)


class StageProgress(_Bar):
    """A progress bar over the phases of a stage (``update(phase, done, total)``), on stderr."""

    def __init__(self, enabled: bool = True):
        super().__init__(
            enabled,
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,}"),
        )
        self.tasks: dict[str, Any] = {}

    def update(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], completed=done, total=total)


class TrainProgress(_Bar):
    """Training steps with the running loss and tokens/s, on stderr."""

    def __init__(self, enabled: bool = True):
        super().__init__(
            enabled,
            TextColumn("[bold]training"),
            BarColumn(),
            TextColumn("step {task.completed:,}/{task.total:,}"),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("{task.fields[rate]:,.0f} tokens/s"),
        )
        self.task: Any = None

    def update(self, step: int, total: int, loss: float, rate: float) -> None:
        if not self.enabled:
            return
        if self.task is None:
            self.task = self.bar.add_task("training", total=total, loss=loss, rate=rate)
        self.bar.update(self.task, completed=step, total=total, loss=loss, rate=rate)
