"""One pull: kick off (or resume) an export, poll it, download its files into the landing location.

``pull()`` is crash-safe. Its row in ``ops.bulk_pull`` says how far it got, and the next pull of the same server
and scope carries on from there instead of starting another export (servers allow one at a time):

- killed while the server exports: the stored status URL is polled again;
- killed while downloading: the files already stored are kept, the others are downloaded;
- the server forgot the job (404/410 on the status URL: expired, restarted): that pull is marked failed and a new
  export starts;
- the server failed the export, or refused the credentials: the pull is marked failed, the status URL gets a
  ``DELETE`` (so the server can drop the job), and the error carries the server's OperationOutcome text.

After the last file is stored the folder is committed (``landing``), the pull is ``complete`` with the manifest's
``transactionTime`` (the next ``--since auto``), and the status URL gets a ``DELETE`` (the IG's way to tell the
server its files may go). ``cancel()`` sends ``DELETE`` to an unfinished pull's status URL and marks it
``cancelled``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

from odyssey_batch.pull import landing, state
from odyssey_batch.pull.auth import Auth, AuthError, build_auth
from odyssey_batch.pull.client import BulkClient, ExportFailed, ExportRequest, JobGone
from odyssey_batch.pull.retry import RetryPolicy
from odyssey_batch.settings import Settings
from odyssey_batch.storage import open_location
from odyssey_batch.warehouse import connect, database_url


class PullProgress(Protocol):
    def phase(self, description: str) -> None: ...

    def server_progress(self, text: str) -> None: ...

    def start_files(self, total: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def file_done(self, name: str) -> None: ...


class _Quiet:
    def phase(self, description: str) -> None:
        pass

    def server_progress(self, text: str) -> None:
        pass

    def start_files(self, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def file_done(self, name: str) -> None:
        pass


@dataclass(frozen=True)
class PullOptions:
    server: str
    level: str = "system"  # system | patient | group
    group: str = ""
    types: tuple[str, ...] = ()
    type_filters: tuple[str, ...] = ()
    since: str = "auto"  # auto | none | an instant
    to: str = ""  # the landing location (default: settings.pull_landing)
    method: str = "auto"  # auto | get | post


@dataclass
class PullResult:
    pull_id: int
    server: str
    scope: str
    status: str
    destination: str
    since: str | None
    transaction_time: str | None
    resumed: bool
    files: int
    bytes: int
    resources: int
    errors: int
    deleted: int
    seconds: float
    first_byte_s: float | None = None  # from the kick-off (or resume) to the first downloaded byte
    requires_access_token: bool = False
    events: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def server_id(server: str) -> str:
    """The server's base URL as stored and shown: no credentials, no query, no trailing slash."""
    parts = urlsplit(server.strip())
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def _request(options: PullOptions, since: str | None) -> ExportRequest:
    return ExportRequest(level=options.level, group=options.group, types=tuple(options.types),
                         type_filters=tuple(options.type_filters), since=since)  # fmt: skip


def make_client(server: str, settings: Settings, http: httpx.Client | None = None,
                auth: Auth | None = None) -> tuple[BulkClient, httpx.Client]:  # fmt: skip
    http = http or httpx.Client(timeout=httpx.Timeout(60.0, connect=15.0))
    auth = auth or build_auth(
        http, server, kind=settings.pull_auth, client_id=settings.pull_client_id,
        private_key=settings.pull_private_key, key_id=settings.pull_key_id, scope=settings.pull_scope,
        token_url=settings.pull_token_url, bearer_token=settings.pull_bearer_token,
    )  # fmt: skip
    policy = RetryPolicy(max_wait=settings.pull_max_wait_s)
    return BulkClient(http, server, auth, policy), http


@contextlib.contextmanager
def _connections(url: str, server: str) -> Iterator[Any]:
    lock_conn = connect(url)
    conn = connect(url)
    try:
        state.take_server_lock(lock_conn, server)
        yield conn
    finally:
        conn.close()
        lock_conn.close()  # releases the server's lock


def pull(options: PullOptions, settings: Settings, *, url: str | None = None, progress: PullProgress | None = None,
         client: BulkClient | None = None) -> PullResult:  # fmt: skip
    """Pull one export into the landing location (see the module docstring)."""
    progress = progress or _Quiet()
    started = time.perf_counter()
    server = server_id(options.server)
    landing_uri = options.to or settings.pull_landing
    if not landing_uri:
        raise ValueError("no landing location: give --to, or set ODYSSEY_PULL_LANDING")
    request = _request(options, None)
    url = url or database_url(settings)
    owned_http = None
    if client is None:
        client, owned_http = make_client(server, settings)
    client.callbacks.progress = progress.server_progress
    try:
        with _connections(url, server) as conn:
            return _pull(conn, client, options, request, server, landing_uri, settings, progress, started)
    finally:
        if owned_http is not None:
            owned_http.close()


def _pull(conn, client: BulkClient, options: PullOptions, request: ExportRequest, server: str, landing_uri: str,
          settings: Settings, progress: PullProgress, started: float) -> PullResult:  # fmt: skip
    events: list[str] = []
    row = state.unfinished(conn, server, request.scope)
    resumed = row is not None
    if row is not None and row["filters"] != request.filters:
        raise ValueError(
            f"pull {row['pull_id']} from {server} ({request.scope}) did not finish and asked for other resources "
            f"({row['filters'] or 'everything'}): resume it with the same --type/--type-filter, or cancel it "
            "with --cancel"
        )
    if row is not None and row["status"] == "kicking-off":
        # Killed between the kick-off and storing its answer: nothing to resume.
        state.update(conn, row["pull_id"], status="failed", error="killed during the kick-off")
        events.append(f"pull {row['pull_id']} was killed during its kick-off: a new export starts")
        row, resumed = None, False
    first_byte: list[float] = []
    for _ in range(2):  # a second try only when a resumed job turned out to be gone
        if row is None:
            since = _resolve_since(conn, options.since, server, request)
            request = _request(options, since)
            pull_id = state.create(conn, server, request.scope, request.filters,
                                   {"path": request.path(), "params": request.params()}, since)  # fmt: skip
            progress.phase("kick-off")
            t0 = time.perf_counter()
            try:
                status_url = client.kickoff(request, options.method)
            except (ExportFailed, AuthError) as exc:
                state.update(conn, pull_id, status="failed", error=str(exc))
                raise
            state.update(conn, pull_id, status="exporting", status_url=status_url)
            row = {"pull_id": pull_id, "status": "exporting", "status_url": status_url, "manifest": None,
                   "since": since, "files_done": {}, "destination": None}  # fmt: skip
        else:
            t0 = time.perf_counter()
            events.append(f"resumed pull {row['pull_id']} ({row['status']})")
        pull_id = row["pull_id"]
        try:
            if row["status"] == "exporting":
                progress.phase("waiting for the server's export")
                manifest = client.poll(row["status_url"], on_progress=_progress_saver(conn, pull_id))
                transaction_time = manifest.get("transactionTime")
                destination = landing.folder_name(transaction_time, pull_id)
                resources = sum(int(e.get("count") or 0) for e in manifest.get("output") or [] if isinstance(e, dict))
                state.update(conn, pull_id, status="downloading", manifest=manifest, destination=destination,
                             transaction_time=transaction_time, resources=resources)  # fmt: skip
                row.update(status="downloading", manifest=manifest, destination=destination)
        except JobGone as exc:
            if not resumed:
                state.update(conn, pull_id, status="failed", error=str(exc))
                raise ExportFailed(str(exc)) from exc
            state.update(conn, pull_id, status="failed", error=f"the server no longer knows the job: {exc}")
            events.append(f"pull {pull_id}: the server no longer knows its job; a new export starts")
            row, resumed = None, False
            continue
        except (ExportFailed, AuthError) as exc:
            _fail(conn, client, pull_id, row.get("status_url"), exc)
            raise
        break
    assert row is not None
    stats = _download(conn, client, row, landing_uri, settings, progress, first_byte, t0)
    manifest = row["manifest"]
    state.update(conn, pull_id, status="complete", progress="complete")
    client.cancel(row["status_url"])  # the IG: the client may DELETE the status URL once it has the files
    return PullResult(
        pull_id=pull_id, server=server, scope=request.scope, status="complete",
        destination=f"{landing_uri.rstrip('/')}/{row['destination']}", since=_text_time(row.get("since")),
        transaction_time=manifest.get("transactionTime"), resumed=resumed, files=stats["files"],
        bytes=stats["bytes"], resources=stats["resources"], errors=stats["errors"], deleted=stats["deleted"],
        seconds=time.perf_counter() - started, first_byte_s=(first_byte[0] - t0) if first_byte else None,
        requires_access_token=bool(manifest.get("requiresAccessToken")), events=events,
    )  # fmt: skip


def _progress_saver(conn, pull_id: int):
    def save(text: str) -> None:
        state.update(conn, pull_id, progress=text)

    return save


def _text_time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def _resolve_since(conn, since: str, server: str, request: ExportRequest) -> str | None:
    if since in ("", "none", "full"):
        return None
    if since == "auto":
        return state.last_transaction_time(conn, server, request.scope, request.filters)
    return since


def _fail(conn, client: BulkClient, pull_id: int, status_url: str | None, exc: BaseException) -> None:
    state.update(conn, pull_id, status="failed", error=str(exc))
    if status_url:
        with contextlib.suppress(Exception):
            client.cancel(status_url)


def _download(conn, client: BulkClient, row: dict[str, Any], landing_uri: str, settings: Settings,
              progress: PullProgress, first_byte: list[float], t0: float) -> dict[str, int]:  # fmt: skip
    """Download every file of the manifest not stored yet, then commit the folder."""
    manifest = row["manifest"]
    pull_id = row["pull_id"]
    folder = row["destination"]
    location = open_location(landing_uri, settings)
    done: dict[str, str] = dict(row.get("files_done") or {})
    if not done:
        location.put_bytes(f"{folder}/{landing.INCOMPLETE_MARKER}", b"odyssey-batch pull in progress\n")
    todo = [(kind, index, entry) for kind, index, entry in landing.entries(manifest) if entry["url"] not in done]
    with_token = bool(manifest.get("requiresAccessToken")) and client.auth.sends_token
    progress.phase("downloading")
    progress.start_files(len(landing.entries(manifest)))
    for _ in range(len(done)):
        progress.file_done("")
    total_bytes = 0
    previous = client.callbacks.downloaded

    def downloaded(nbytes: int) -> None:
        if not first_byte:
            first_byte.append(time.perf_counter())
        progress.advance(nbytes)

    client.callbacks.downloaded = downloaded
    scratch = Path(tempfile.mkdtemp(prefix=f"pull-{pull_id}-", dir=_scratch_root(settings)))
    try:

        def fetch(kind: str, index: int, entry: dict[str, Any]) -> tuple[str, str, int]:
            target = scratch / f"{kind}-{index}-{entry.get('type') or ''}"
            nbytes, gzipped = client.download(entry["url"], target, with_token=with_token)
            name = landing.file_name(kind, entry.get("type"), index, gzipped)
            location.put_file(f"{folder}/{name}", target)
            target.unlink()
            return entry["url"], name, nbytes

        workers = max(1, settings.pull_download_workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull-download") as pool:
            pending: set[Future] = {pool.submit(fetch, *item) for item in todo}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        url, name, nbytes = future.result()
                        state.file_done(conn, pull_id, url, name)
                        done[url] = name
                        total_bytes += nbytes
                        progress.file_done(name)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        client.callbacks.downloaded = previous
        shutil.rmtree(scratch, ignore_errors=True)
    extra = {"pull_id": pull_id, "server": state_server(conn, pull_id), "since": _text_time(row.get("since"))}
    location.put_bytes(f"{folder}/manifest.json", landing.local_manifest(manifest, done, extra))
    location.delete(f"{folder}/{landing.INCOMPLETE_MARKER}")
    counts = {"output": 0, "error": 0, "deleted": 0}
    for kind, _index, _entry in landing.entries(manifest):
        counts[kind] += 1
    resources = sum(int(e.get("count") or 0) for e in manifest.get("output") or [] if isinstance(e, dict))
    return {"files": sum(counts.values()), "bytes": total_bytes, "resources": resources, "errors": counts["error"],
            "deleted": counts["deleted"]}  # fmt: skip


def state_server(conn, pull_id: int) -> str:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT server FROM ops.bulk_pull WHERE pull_id = %s", (pull_id,))
        return cur.fetchone()[0]


def _scratch_root(settings: Settings) -> str:
    root = Path(settings.home) / "pull-scratch"
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def cancel(options: PullOptions, settings: Settings, *, url: str | None = None,
           client: BulkClient | None = None) -> dict[str, Any]:  # fmt: skip
    """Cancel the unfinished pull of this server and scope: ``DELETE`` its status URL, mark it cancelled."""
    server = server_id(options.server)
    scope = _request(options, None).scope
    url = url or database_url(settings)
    owned_http = None
    if client is None:
        client, owned_http = make_client(server, settings)
    conn = connect(url)
    try:
        row = state.unfinished(conn, server, scope)
        if row is None:
            return {"server": server, "scope": scope, "cancelled": None, "message": "no unfinished pull to cancel"}
        answer = client.cancel(row["status_url"]) if row.get("status_url") else 0
        state.update(conn, row["pull_id"], status="cancelled", error="cancelled by odyssey-batch pull --cancel")
        return {"server": server, "scope": scope, "cancelled": row["pull_id"], "server_answer": answer,
                "message": f"pull {row['pull_id']} cancelled (the server answered {answer or 'nothing'})"}  # fmt: skip
    finally:
        conn.close()
        if owned_http is not None:
            owned_http.close()
