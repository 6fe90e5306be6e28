"""A small, strict Bulk Data server for what sekmet-fhir does not do (stdlib ``http.server``, loopback, threads).

sekmet 0.1.1 has no ``deleted[]`` in its manifest, always says ``requiresAccessToken`` as its auth (true unless
open), answers polls with ``Retry-After: 1`` only, never 429/503 and never gzip. This server does, on purpose,
what the IG allows and real servers (Epic, Oracle Health) do:

- kick-off: requires ``Prefer: respond-async`` and a bearer token; **rejects a repeated ``_type``** (400, as Epic
  does); answers 429 + ``Retry-After: 1`` to the first kick-off when ``busy_first``; records every kick-off's
  query;
- SMART token endpoint (``/auth/token``, found through ``.well-known/smart-configuration``) that fails with 503
  ``flaky_tokens`` times first, and issues tokens valid for ``token_uses`` requests (then 401 "expired");
- status: 202 with ``X-Progress`` and a ``Retry-After`` as an **HTTP date**, a 503 with a transient
  OperationOutcome once, then the manifest (``requiresAccessToken: false``, ``output``, ``error`` and ``deleted``);
  while ``hold`` is set the job stays at 202;
- files: gzip-encoded when asked (``Accept-Encoding: gzip``); a file named in ``stall`` waits until released;
  every file request's ``Authorization`` header is recorded (it must be absent: requiresAccessToken is false);
- ``DELETE`` on the status URL: 202, recorded.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Behaviour:
    files: dict[str, bytes]  # name -> NDJSON bytes (output, error and deleted files)
    output: list[dict]  # manifest entries, url = file name (made absolute)
    error: list[dict] = field(default_factory=list)
    deleted: list[dict] = field(default_factory=list)
    busy_first: bool = True
    flaky_tokens: int = 1
    token_uses: int = 1000
    hold: threading.Event = field(default_factory=threading.Event)  # set: the job may complete
    stall: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    transaction_time: str = "2026-12-05T02:00:00Z"  # the manifest's transactionTime
    # recorded
    kickoffs: list[str] = field(default_factory=list)
    polls: int = 0
    deletes: int = 0
    file_auth: list[tuple[str, str | None]] = field(default_factory=list)
    tokens_issued: int = 0


class StrictBulkServer:
    TOKEN_PREFIX = "strict-token-"

    def __init__(self, behaviour: Behaviour):
        self.b = behaviour
        self.lock = threading.Lock()
        self.token_uses: dict[str, int] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def static_token(self, token: str) -> str:
        """Accept ``token`` as a bearer token (for servers configured with a static token)."""
        self.token_uses[token] = 0
        return token

    def __enter__(self) -> StrictBulkServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.b.release.set()
        self.b.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _outcome(self, status: int, code: str, text: str, headers: dict | None = None) -> None:
                body = {"resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": code, "diagnostics": text}]}  # fmt: skip
                self._send(status, json.dumps(body).encode(), {"Content-Type": "application/fhir+json",
                                                              **(headers or {})})  # fmt: skip

            def _authorized(self) -> bool:
                header = self.headers.get("Authorization", "")
                token = header.removeprefix("Bearer ")
                with server.lock:
                    uses = server.token_uses.get(token)
                    if uses is None:
                        self._outcome(401, "login", "unknown token")
                        return False
                    if uses >= server.b.token_uses:
                        self._outcome(401, "expired", "access token expired")
                        return False
                    server.token_uses[token] = uses + 1
                return True

            def do_POST(self) -> None:  # the token endpoint
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                if path != "/auth/token":
                    return self._outcome(405, "not-supported", "POST kick-off not supported here")
                with server.lock:
                    if server.b.flaky_tokens > 0:
                        server.b.flaky_tokens -= 1
                        return self._send(503, b"try later", {"Retry-After": "0"})
                if "client_assertion" not in form or form.get("grant_type") != ["client_credentials"]:
                    return self._send(400, json.dumps({"error": "invalid_request"}).encode())
                with server.lock:
                    server.b.tokens_issued += 1
                    token = f"{server.TOKEN_PREFIX}{server.b.tokens_issued}-abcdef"
                    server.token_uses[token] = 0
                body = {"access_token": token, "token_type": "bearer", "expires_in": 300, "scope": "system/*.rs"}
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

            def do_DELETE(self) -> None:
                if not self._authorized():
                    return
                server.b.deletes += 1
                self._send(202)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = parts.path
                if path == "/fhir/.well-known/smart-configuration":
                    body = {"token_endpoint": server.base_url.removesuffix("/fhir") + "/auth/token",
                            "capabilities": ["client-confidential-asymmetric"]}  # fmt: skip
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                if path.startswith("/files/"):
                    return self._file(path.removeprefix("/files/"))
                if not self._authorized():
                    return
                if path.endswith("$export"):
                    query = parse_qs(parts.query)
                    server.b.kickoffs.append(parts.query)
                    if len(query.get("_type", [])) > 1:
                        return self._outcome(400, "invalid", "_type may be given once (comma separated)")
                    if "respond-async" not in (self.headers.get("Prefer") or ""):
                        return self._outcome(400, "invalid", "Prefer: respond-async is required")
                    if server.b.busy_first and len(server.b.kickoffs) == 1:
                        return self._outcome(429, "throttled", "an export is running", {"Retry-After": "1"})
                    return self._send(202, headers={"Content-Location": server.base_url + "/status/job1"})
                if path.endswith("/status/job1"):
                    server.b.polls += 1
                    if server.b.polls == 1 or not server.b.hold.is_set():
                        when = email.utils.formatdate(time.time() + 1, usegmt=True)
                        return self._send(202, headers={"X-Progress": f"poll {server.b.polls}", "Retry-After": when})
                    if server.b.polls == 2:
                        return self._outcome(503, "transient", "busy, try again", {"Retry-After": "0"})
                    base = server.base_url.removesuffix("/fhir") + "/files/"
                    manifest = {
                        "transactionTime": server.b.transaction_time, "request": server.base_url + "/$export",
                        "requiresAccessToken": False,
                        "output": [{**e, "url": base + e["url"]} for e in server.b.output],
                        "error": [{**e, "url": base + e["url"]} for e in server.b.error],
                        "deleted": [{**e, "url": base + e["url"]} for e in server.b.deleted],
                    }  # fmt: skip
                    return self._send(200, json.dumps(manifest).encode(), {"Content-Type": "application/json"})
                return self._outcome(404, "not-found", "no such endpoint")

            def _file(self, name: str) -> None:
                server.b.file_auth.append((name, self.headers.get("Authorization")))
                if name in server.b.stall:
                    server.b.release.wait(60)
                data = server.b.files.get(name)
                if data is None:
                    return self._outcome(404, "not-found", "no such file")
                if "gzip" in (self.headers.get("Accept-Encoding") or ""):
                    return self._send(200, gzip.compress(data), {"Content-Type": "application/fhir+ndjson",
                                                                 "Content-Encoding": "gzip"})  # fmt: skip
                self._send(200, data, {"Content-Type": "application/fhir+ndjson"})

        return Handler
