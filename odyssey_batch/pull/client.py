"""The HTTP side of a Bulk Data export (FHIR Bulk Data Access IG 2.0): kick-off, status polling, downloads, cancel.

- **Kick-off**: ``[base]/$export``, ``[base]/Patient/$export`` or ``[base]/Group/<id>/$export`` with
  ``Prefer: respond-async`` and ``Accept: application/fhir+json``; ``_outputFormat``, ``_since``, ``_type`` as **one
  comma-separated value** (Epic and others reject a repeated ``_type``) and ``_typeFilter`` as one comma-separated
  value whose queries have their own commas escaped as ``%2C`` (so a server splitting on commas keeps
  ``code=a,b`` whole). GET; or POST with a ``Parameters`` body (``method="post"``), which ``auto`` falls back to
  when the server answers GET with 405 or 414.
- **Status**: 202 while running (``X-Progress`` shown, ``Retry-After`` honoured, capped), 200 with the manifest.
- **Errors**: 429, an ``OperationOutcome`` whose issue code is transient (``transient``, ``throttled``, ``timeout``,
  ``lock-error``, ``no-store``, ``incomplete``), a 5xx without an OperationOutcome, and network errors are retried
  with capped exponential backoff (``RetryPolicy``); anything else is an ``ExportFailed`` carrying the server's
  OperationOutcome text. A 5xx **with** a non-transient OperationOutcome (e.g. ``exception``) is the job failing, as
  the IG describes, and is not retried. A 401 gets a new token once.
- **Downloads**: streamed in 1 MiB pieces to a file (bounded memory, whatever the file's size), ``Accept-Encoding:
  gzip`` (a gzip answer is stored as it came, ``.ndjson.gz``), the token sent only when the manifest says
  ``requiresAccessToken: true`` (and never across a redirect to another origin: httpx drops it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from odyssey_batch import redaction
from odyssey_batch.pull.auth import Auth
from odyssey_batch.pull.retry import RetryPolicy

FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"
TRANSIENT_CODES = frozenset({"transient", "throttled", "timeout", "lock-error", "no-store", "incomplete"})
CHUNK = 1 << 20


class ExportFailed(RuntimeError):
    """The server refused or failed the export; retrying the same request does not help."""


class JobGone(RuntimeError):
    """The status URL is unknown to the server (expired, cancelled, or the server restarted)."""


class Transient(RuntimeError):
    """A failure worth retrying, with the server's Retry-After when it gave one."""

    def __init__(self, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ExportRequest:
    level: str = "system"  # system | patient | group
    group: str = ""
    types: tuple[str, ...] = ()
    type_filters: tuple[str, ...] = ()
    since: str | None = None
    output_format: str = NDJSON

    @property
    def scope(self) -> str:
        return f"group/{self.group}" if self.level == "group" else self.level

    @property
    def filters(self) -> str:
        """What the request selects besides its scope, for matching earlier pulls (``--since auto``)."""
        return "&".join(f"{k}={v}" for k, v in self.params() if k in ("_type", "_typeFilter"))

    def path(self) -> str:
        if self.level == "system":
            return "$export"
        if self.level == "patient":
            return "Patient/$export"
        if self.level == "group" and self.group:
            return f"Group/{quote(self.group, safe='')}/$export"
        raise ValueError("a group export needs the group id")

    def params(self) -> list[tuple[str, str]]:
        out = [("_outputFormat", self.output_format)]
        if self.since:
            out.append(("_since", self.since))
        if self.types:
            out.append(("_type", ",".join(self.types)))
        if self.type_filters:
            out.append(("_typeFilter", ",".join(escape_type_filter(f) for f in self.type_filters)))
        return out

    def parameters(self) -> dict[str, Any]:
        """The same request as a ``Parameters`` resource, for POST kick-offs."""
        parameter: list[dict[str, str]] = [{"name": "_outputFormat", "valueString": self.output_format}]
        if self.since:
            parameter.append({"name": "_since", "valueInstant": self.since})
        if self.types:
            parameter.append({"name": "_type", "valueString": ",".join(self.types)})
        parameter += [{"name": "_typeFilter", "valueString": escape_type_filter(f)} for f in self.type_filters]
        return {"resourceType": "Parameters", "parameter": parameter}


def escape_type_filter(query: str) -> str:
    """``Observation?code=a,b`` -> ``Observation?code=a%2Cb``: commas inside one query escaped, so that commas
    only separate queries."""
    return query.replace(",", "%2C")


def outcome_text(response: httpx.Response) -> tuple[str, set[str]]:
    """The diagnostics/details of an OperationOutcome answer (redacted) and its issue codes."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code} {response.reason_phrase}".strip(), set()
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return f"HTTP {response.status_code} {response.reason_phrase}".strip(), set()
    texts, codes = [], set()
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        codes.add(str(issue.get("code", "")))
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        texts.append(f"{issue.get('severity', 'error')}: {text}")
    return redaction.redact("; ".join(texts) or f"HTTP {response.status_code}"), codes


def classify(response: httpx.Response, what: str) -> Exception:
    """The exception for an error answer: ``Transient`` (retry) or ``ExportFailed`` (give up)."""
    text, codes = outcome_text(response)
    message = f"{what}: HTTP {response.status_code}: {text}"
    retry_after = response.headers.get("Retry-After")
    if response.status_code == 429 or codes & TRANSIENT_CODES:
        return Transient(message, retry_after)
    if response.status_code >= 500 and not codes:
        return Transient(message, retry_after)
    return ExportFailed(message)


@dataclass
class Callbacks:
    progress: Callable[[str], None] = lambda text: None
    waiting: Callable[[float], None] = lambda seconds: None
    downloaded: Callable[[int], None] = lambda nbytes: None


@dataclass
class BulkClient:
    http: httpx.Client
    base_url: str
    auth: Auth
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    callbacks: Callbacks = field(default_factory=Callbacks)

    def _url(self, path: str) -> str:
        return self.base_url.rstrip("/") + "/" + path

    def _send(self, method: str, url: str, *, token: bool = True, **kwargs: Any) -> httpx.Response:
        """One request, with a fresh token after a 401 (once) and retries of transient failures."""
        attempt, reauthed = 0, False
        base_headers = kwargs.pop("headers", {})
        while True:
            headers = {**base_headers, **(self.auth.headers() if token else {})}
            try:
                response = self.http.request(method, url, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                failure: Exception = Transient(f"{method} {url}: {type(exc).__name__}: {exc}")
            else:
                if response.status_code == 401 and token and self.auth.sends_token and not reauthed:
                    self.auth.invalidate()  # expired or revoked: one new token, then the answer stands
                    reauthed = True
                    continue
                if response.status_code < 400 or response.status_code in (404, 405, 410, 414):
                    return response
                failure = classify(response, f"{method} {url}")
            if not isinstance(failure, Transient) or attempt >= self.policy.max_attempts:
                raise failure
            wait = self.policy.wait(attempt, failure.retry_after)
            self.callbacks.waiting(wait)
            self.sleep(wait)
            attempt += 1

    def kickoff(self, request: ExportRequest, method: str = "auto") -> str:
        """Start the export; returns its status URL."""
        headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
        url = self._url(request.path())
        response = None
        if method in ("auto", "get"):
            response = self._send("GET", url, params=request.params(), headers=dict(headers))
        if method == "post" or (method == "auto" and response is not None and response.status_code in (405, 414)):
            response = self._send("POST", url, json=request.parameters(),
                                  headers={**headers, "Content-Type": FHIR_JSON})  # fmt: skip
        assert response is not None
        if response.status_code != 202:
            text, _ = outcome_text(response)
            raise ExportFailed(f"kick-off {url}: HTTP {response.status_code}: {text}")
        location = response.headers.get("Content-Location")
        if not location:
            raise ExportFailed(f"kick-off {url}: HTTP 202 without a Content-Location (no status URL)")
        return location

    def poll(self, status_url: str, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Poll until the export completes; returns the manifest. ``JobGone`` when the server lost the job."""
        polls = 0
        while True:
            response = self._send("GET", status_url, headers={"Accept": "application/json"})
            if response.status_code in (404, 410):
                raise JobGone(f"{status_url}: HTTP {response.status_code}: {outcome_text(response)[0]}")
            if response.status_code == 200:
                try:
                    manifest = response.json()
                except ValueError:
                    raise ExportFailed(f"{status_url}: the manifest is not JSON") from None
                if not isinstance(manifest, dict) or not isinstance(manifest.get("output", []), list):
                    raise ExportFailed(f"{status_url}: the manifest is not a Bulk Data manifest")
                return manifest
            if response.status_code != 202:
                raise classify(response, f"GET {status_url}")
            progress = response.headers.get("X-Progress", "")
            self.callbacks.progress(progress)
            if on_progress is not None:
                on_progress(progress)
            wait = self.policy.wait(polls, response.headers.get("Retry-After"))
            self.callbacks.waiting(wait)
            self.sleep(wait)
            polls += 1

    def cancel(self, status_url: str) -> int:
        """DELETE the status URL (cancel a running export, or let the server drop a finished one's files)."""
        try:
            return self._send("DELETE", status_url, headers={"Accept": FHIR_JSON}).status_code
        except (ExportFailed, Transient):
            return 0

    def download(self, url: str, target: Path, *, with_token: bool) -> tuple[int, bool]:
        """Stream ``url`` into ``target``; returns (bytes written, whether they are gzip). Retries transient
        failures from the start of the file; the token only when ``with_token``."""
        attempt, reauthed = 0, False
        while True:
            headers = {"Accept": NDJSON, "Accept-Encoding": "gzip"}
            if with_token:
                headers.update(self.auth.headers())
            try:
                with self.http.stream("GET", url, headers=headers, follow_redirects=True) as response:
                    if response.status_code == 401 and with_token and not reauthed:
                        self.auth.invalidate()
                        reauthed = True
                        continue
                    if response.status_code != 200:
                        response.read()
                        raise classify(response, f"GET {url}")
                    gzipped = response.headers.get("Content-Encoding", "").lower() == "gzip"
                    expected = response.headers.get("Content-Length")
                    written = 0
                    with target.open("wb") as out:
                        for piece in response.iter_raw(CHUNK):
                            out.write(piece)
                            written += len(piece)
                            self.callbacks.downloaded(len(piece))
                    if expected is not None and expected.isdigit() and int(expected) != written:
                        raise Transient(f"GET {url}: {written} bytes of {expected} arrived")
                    return written, gzipped
            except httpx.TransportError as exc:
                failure: Exception = Transient(f"GET {url}: {type(exc).__name__}: {exc}")
            except Transient as exc:
                failure = exc
            if attempt >= self.policy.max_attempts:
                raise failure
            wait = self.policy.wait(attempt, getattr(failure, "retry_after", None))
            self.callbacks.waiting(wait)
            self.sleep(wait)
            attempt += 1
