"""A location is a folder of files: a local directory or an ``s3://bucket/prefix``.

Ingest reads exports from one; later stages write artifacts to one (the object store). Both kinds list files
recursively with paths relative to the location, and stream them, so a large export never has to fit in memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from odyssey_batch.settings import Settings


@dataclass(frozen=True)
class StoredFile:
    name: str  # path relative to the location, with '/' separators
    size: int


class Location(Protocol):
    uri: str

    def list_files(self) -> list[StoredFile]: ...

    def open(self, name: str) -> AbstractContextManager[BinaryIO]: ...

    def put_file(self, name: str, local_path: Path) -> str: ...

    def describe(self, name: str) -> str: ...


class LocalLocation:
    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        self.uri = str(self.root)

    def list_files(self) -> list[StoredFile]:
        if not self.root.exists():
            raise FileNotFoundError(f"no such folder: {self.root}")
        if self.root.is_file():
            return [StoredFile(self.root.name, self.root.stat().st_size)]
        files = [
            StoredFile(p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p in self.root.rglob("*")
            if p.is_file()
        ]
        return sorted(files, key=lambda f: f.name)

    def _path(self, name: str) -> Path:
        return self.root if self.root.is_file() else self.root / name

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        with self._path(name).open("rb") as fh:
            yield fh

    def put_file(self, name: str, local_path: Path) -> str:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, target)
        return str(target)

    def describe(self, name: str) -> str:
        return str(self._path(name))


class S3Location:
    def __init__(self, bucket: str, prefix: str, settings: Settings):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = s3_client(settings)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def list_files(self) -> list[StoredFile]:
        # Only ListObjects, the one permission a reader of a prefix surely has: no HeadBucket first, whose
        # authorization differs between S3 implementations.
        from minio.error import S3Error

        start = len(self.prefix) + 1 if self.prefix else 0
        files = []
        try:
            for obj in self.client.list_objects(self.bucket, prefix=self._key(""), recursive=True):
                if obj.is_dir or obj.object_name is None:
                    continue
                files.append(StoredFile(obj.object_name[start:], int(obj.size or 0)))
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise FileNotFoundError(f"no such bucket: {self.bucket}") from None
            raise
        return sorted(files, key=lambda f: f.name)

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        response = self.client.get_object(self.bucket, self._key(name))
        if name.lower().endswith(".gz"):
            # A .gz object stored with ``Content-Encoding: gzip`` must reach us still compressed.
            response.decode_content = False
        try:
            yield response  # urllib3 response: a readable binary stream
        finally:
            response.close()
            response.release_conn()

    def put_file(self, name: str, local_path: Path) -> str:
        self.client.fput_object(self.bucket, self._key(name), str(local_path))
        return f"s3://{self.bucket}/{self._key(name)}"

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"


def s3_client(settings: Settings):
    """A ``minio`` client for the configured S3 endpoint (``host:port`` or ``http(s)://host:port``)."""
    from minio import Minio

    endpoint = settings.s3_endpoint
    if not endpoint:
        raise ValueError("an s3:// location needs ODYSSEY_S3_ENDPOINT (e.g. localhost:9000) and credentials")
    secure = settings.s3_secure
    if endpoint.startswith("http://"):
        endpoint, secure = endpoint[len("http://") :], False
    elif endpoint.startswith("https://"):
        endpoint, secure = endpoint[len("https://") :], True
    return Minio(
        endpoint.rstrip("/"),
        access_key=settings.s3_access_key or None,
        secret_key=settings.s3_secret_key or None,
        secure=secure,
        region=settings.s3_region or None,
    )


def open_location(uri: str, settings: Settings) -> Location:
    """A location for ``s3://bucket/prefix`` or a local path."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"missing bucket name in {uri!r}")
        return S3Location(bucket, prefix, settings)
    return LocalLocation(Path(uri))
