"""``odyssey-batch pull``: an export from a FHIR server's Bulk Data ``$export`` into the landing location.

``register(app)`` adds the command to the main typer app (``cli/main.py``). The HTTP stack is imported inside the
command, so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

from odyssey_batch.cli.context import open_warehouse
from odyssey_batch.cli.output import _Bar, console, emit_json, err_console

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the human summary.")]


class PullProgress(_Bar):
    """The server's X-Progress while it exports, then the files and bytes downloaded, on stderr."""

    def __init__(self, enabled: bool = True):
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   DownloadColumn(), TransferSpeedColumn())  # fmt: skip
        super().__init__(enabled, *columns)
        self.task: Any = None
        self.files = 0
        self.total = 0

    def _ensure(self) -> None:
        if self.enabled and self.task is None:
            self.task = self.bar.add_task("kick-off", total=None, info="")

    def phase(self, description: str) -> None:
        self._ensure()
        if self.task is not None:
            self.bar.update(self.task, description=description)

    def server_progress(self, text: str) -> None:
        self._ensure()
        if self.task is not None:
            self.bar.update(self.task, info=f"server: {escape(text)[:60]}")

    def start_files(self, total: int) -> None:
        self.total = total
        self._ensure()
        if self.task is not None:
            self.bar.update(self.task, info=f"files 0/{total}", completed=0)

    def advance(self, nbytes: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, nbytes)

    def file_done(self, name: str) -> None:
        self.files += 1
        if self.task is not None:
            self.bar.update(self.task, info=f"files {self.files}/{self.total}")


ServerOption = Annotated[str, typer.Option(help="The FHIR server's base URL (e.g. https://ehr.hospital/fhir/R4).")]
GroupOption = Annotated[str, typer.Option(help="Export this Group (Group/<id>/$export).")]
PatientOption = Annotated[bool, typer.Option("--patient-level", help="Patient/$export: every patient.")]
SystemOption = Annotated[bool, typer.Option("--system-level", help="$export: everything (the default).")]
TypeOption = Annotated[
    list[str] | None,
    typer.Option("--type", help="Resource types (repeat, or comma separated); sent as one comma-separated _type."),
]
TypeFilterOption = Annotated[
    list[str] | None,
    typer.Option("--type-filter", help="A _typeFilter query, e.g. 'Observation?category=laboratory' (repeat)."),
]
SinceOption = Annotated[
    str,
    typer.Option(
        help="auto: the transactionTime of the last complete pull of this server, scope and filters (none yet: a "
        "full export); none; or an instant."
    ),
]
ToOption = Annotated[
    str, typer.Option(help="Landing location: a folder or s3://bucket/prefix (default ODYSSEY_PULL_LANDING).")
]
MethodOption = Annotated[str, typer.Option(help="Kick-off: auto (GET, POST when the server refuses GET), get, post.")]
CancelOption = Annotated[
    bool,
    typer.Option(
        "--cancel", help="Cancel the unfinished pull of this server and scope (DELETE its status URL) instead."
    ),
]


def pull(
    server: ServerOption,
    group: GroupOption = "",
    patient_level: PatientOption = False,
    system_level: SystemOption = False,
    types: TypeOption = None,
    type_filters: TypeFilterOption = None,
    since: SinceOption = "auto",
    to: ToOption = "",
    method: MethodOption = "auto",
    cancel: CancelOption = False,
    json_output: JsonOption = False,
) -> None:
    """Pull a Bulk Data export from a FHIR server into the landing location, for `ingest`.

    Kicks off `$export` (or resumes the unfinished pull of the same server and scope: a killed pull polls or
    downloads where it stopped), waits for it (Retry-After honoured, X-Progress shown), downloads its files in
    parallel and commits the folder (`manifest.json` + files) last. Authentication from the settings: SMART
    Backend Services (ODYSSEY_PULL_CLIENT_ID, ODYSSEY_PULL_PRIVATE_KEY), a bearer token, or none.
    """
    from odyssey_batch.pull.auth import AuthError
    from odyssey_batch.pull.client import ExportFailed
    from odyssey_batch.pull.run import PullOptions
    from odyssey_batch.pull.run import cancel as cancel_pull
    from odyssey_batch.pull.run import pull as run_pull
    from odyssey_batch.pull.state import PullBusy

    if sum((bool(group), patient_level, system_level)) > 1:
        err_console.print("[red]error:[/] give one of --group, --patient-level, --system-level")
        raise typer.Exit(2)
    level = "group" if group else "patient" if patient_level else "system"
    wanted = tuple(t.strip() for value in types or [] for t in value.split(",") if t.strip())
    options = PullOptions(server=server, level=level, group=group, types=wanted,
                          type_filters=tuple(type_filters or []), since=since, to=to, method=method)  # fmt: skip
    settings, url = open_warehouse()
    try:
        if cancel:
            data = cancel_pull(options, settings, url=url)
        else:
            with PullProgress(enabled=not json_output) as progress:
                data = run_pull(options, settings, url=url, progress=progress).as_dict()
    except (ExportFailed, AuthError, PullBusy, ValueError) as exc:
        err_console.print(f"[red]pull failed:[/] {escape(' '.join(str(exc).split()))}", soft_wrap=True)
        raise typer.Exit(1) from exc
    if json_output:
        emit_json(data)
    elif cancel:
        console.print(data["message"])
    else:
        resumed = " (resumed)" if data["resumed"] else ""
        since_text = f"changes since {data['since']}" if data["since"] else "full export"
        console.print(
            f"pull {data['pull_id']}{resumed}: {since_text}; {data['files']} files, {data['resources']:,} resources, "
            f"{data['errors']} error files, {data['deleted']} deleted files, {data['bytes']:,} bytes in "
            f"{data['seconds']:.1f} s\n-> {escape(data['destination'])}\n"
            f"load it: odyssey-batch ingest {escape(data['destination'])}"
        )


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
