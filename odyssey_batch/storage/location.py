"""A location is a folder of files: a local directory or an ``s3://bucket/prefix``.

Ingest reads exports from one; later stages write artifacts to one (the object store). Both kinds list files
recursively with paths relative to the location, and stream them, so a large export never has to fit in memory.

A location reads only what is inside it. Exports come from other organizations' systems, so the listing
(``listing()``) refuses, with a reason, every entry it will not read: a symbolic link (never followed, wherever it
points), a special file (FIFO, socket, device), a name that is not UTF-8 (shown with escapes), a folder that cannot
be listed, and an S3 key with an empty, ``.`` or ``..`` segment. ``open()`` re-checks the name and, locally, opens
each path component without following links, so a file swapped for a link after the listing is refused too.

Writes are atomic: a reader sees a stored file whole, in its old version or its new one, never part of it, and a
writer killed mid-write leaves the old version (or nothing) under the name. ``put_file`` and ``put_bytes`` are
the only ways to write, and both kinds keep that promise:

- local: the bytes go to a temporary file in the target's own folder (``.<name>.<random>.partial``), are
  fsynced, and ``os.replace`` renames it over the name (then the folder is fsynced, so the rename survives a
  power cut). A kill leaves at most a ``.partial`` file, which no reader opens by name.
- S3: a single PUT (or a multipart upload, which the client uses for large files) is atomic by S3's own
  guarantee: the object under a key appears, or changes, only when the upload completes, and a failed upload
  leaves the key as it was. So the object is uploaded straight under its key; no temporary key and copy are
  needed (a copy would be one more atomic PUT). An abandoned multipart upload leaves invisible parts that a
  bucket lifecycle rule (``AbortIncompleteMultipartUpload``) removes.

Atomic writes make each file whole; publishing several files that must agree (a model version and its
manifest, a checkpoint) is the caller's protocol on top (see ``registry.artifacts`` and
``training.checkpoint``): new content goes under names that nothing committed refers to, and the pointer that
commits it is written (or the registry row updated) last.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import uuid
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


@dataclass(frozen=True)
class RefusedEntry:
    """An entry of a location that is never read: its printable name, a reason code and a one-line message."""

    name: str
    reason: str  # 'symlink' | 'special-file' | 'file-name-not-utf8' | 'unreadable-folder' | 'unsafe-name'
    message: str


@dataclass(frozen=True)
class Listing:
    files: list[StoredFile]
    refused: list[RefusedEntry]


class UnsafeName(OSError):
    """A name that leaves the location, or an entry that is not a regular file inside it (raised by ``open``)."""

    def __init__(self, name: str, reason: str, message: str):
        super().__init__(f"{name}: {message}")
        self.entry = RefusedEntry(name, reason, message)


def printable_name(name: str) -> str:
    """A file name as text that can be printed and stored: bytes that are not UTF-8 appear as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def unsafe_segments(name: str) -> bool:
    """True for a name that is not a plain relative path: absolute, or with an empty, ``.`` or ``..`` part."""
    return name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/"))


def escapes(name: str) -> bool:
    """True for a name that could leave its folder: absolute, or with a ``..`` part."""
    return name.startswith("/") or ".." in name.split("/")


class Location(Protocol):
    uri: str

    def list_files(self) -> list[StoredFile]: ...

    def listing(self) -> Listing: ...

    def open(self, name: str) -> AbstractContextManager[BinaryIO]: ...

    def put_file(self, name: str, local_path: Path) -> str: ...

    def put_bytes(self, name: str, data: bytes) -> str: ...

    def delete(self, name: str) -> None: ...

    def describe(self, name: str) -> str: ...


class LocalLocation:
    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        self.uri = str(self.root)

    def list_files(self) -> list[StoredFile]:
        return self.listing().files

    def listing(self) -> Listing:
        if not self.root.exists():
            raise FileNotFoundError(f"no such folder: {self.root}")
        if self.root.is_file():
            return Listing([StoredFile(self.root.name, self.root.stat().st_size)], [])
        files: list[StoredFile] = []
        refused: list[RefusedEntry] = []
        folders = [""]
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(self.root / folder if folder else self.root) as entries:
                    found = list(entries)
            except OSError as exc:
                if not folder:
                    raise
                refused.append(RefusedEntry(printable_name(folder), "unreadable-folder",
                                            f"folder could not be listed: {exc.strerror}"))  # fmt: skip
                continue
            for entry in found:
                name = f"{folder}/{entry.name}" if folder else entry.name
                problem = self._refusal(name, entry)
                if problem is not None:
                    refused.append(problem)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(name)
                else:
                    files.append(StoredFile(name, entry.stat(follow_symlinks=False).st_size))
        return Listing(sorted(files, key=lambda f: f.name), sorted(refused, key=lambda r: r.name))

    def _refusal(self, name: str, entry: os.DirEntry) -> RefusedEntry | None:
        shown = printable_name(name)
        if shown != name:
            return RefusedEntry(shown, "file-name-not-utf8", "name is not valid UTF-8 (shown with \\x escapes)")
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            inside = target == str(self.root) or target.startswith(str(self.root) + os.sep)
            where = "inside" if inside else "outside"
            return RefusedEntry(
                name, "symlink", f"a symbolic link to a path {where} the folder: links are never followed"
            )
        if not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)):
            return RefusedEntry(name, "special-file", "not a regular file (a FIFO, socket or device)")
        return None

    def _path(self, name: str) -> Path:
        return self.root if self.root.is_file() else self.root / name

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        fd = os.open(self.root, os.O_RDONLY) if self.root.is_file() else self._open_inside(name)
        with os.fdopen(fd, "rb") as fh:
            yield fh

    def _open_inside(self, name: str) -> int:
        """A descriptor for the regular file ``name`` under the root, no path component followed if it is a link."""
        if escapes(name):
            raise UnsafeName(printable_name(name), "unsafe-name", "name leaves the folder (absolute or '..')")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.root, nofollow | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                try:
                    inner = os.open(part, nofollow | os.O_DIRECTORY, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeName(
                            name, "symlink", "a folder on its path is a symbolic link or not a folder"
                        ) from None
                    raise
                os.close(fd)
                fd = inner
            try:
                # O_NONBLOCK: opening a FIFO must not hang; it is refused just below.
                file_fd = os.open(parts[-1], nofollow | os.O_NONBLOCK, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeName(name, "symlink", "a symbolic link: links are never followed") from None
                raise
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            raise UnsafeName(name, "special-file", "not a regular file (a FIFO, socket, device or folder)")
        os.set_blocking(file_fd, True)
        return file_fd

    def _target(self, name: str) -> Path:
        target = (self.root / name).resolve()
        if not name or target == self.root or not target.is_relative_to(self.root):
            raise ValueError(f"{name!r} is not a file name inside {self.root}")
        return target

    def _write(self, name: str, copy) -> str:
        """Write through ``copy(out)`` to a temporary file beside the target, fsync it, and rename it over."""
        target = self._target(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        try:
            with partial.open("wb") as out:
                copy(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)
        return str(target)

    def put_file(self, name: str, local_path: Path) -> str:
        """Store a copy of ``local_path`` under ``name``, atomically; return where it lives."""

        def copy(out: BinaryIO) -> None:
            with Path(local_path).open("rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)

        return self._write(name, copy)

    def put_bytes(self, name: str, data: bytes) -> str:
        """Store ``data`` under ``name``, atomically; return where it lives."""
        return self._write(name, lambda out: out.write(data))

    def delete(self, name: str) -> None:
        """Remove a stored file (nothing happens when there is none)."""
        self._target(name).unlink(missing_ok=True)

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
        return self.listing().files

    def listing(self) -> Listing:
        # Only ListObjects, the one permission a reader of a prefix surely has: no HeadBucket first, whose
        # authorization differs between S3 implementations.
        from minio.error import S3Error

        start = len(self.prefix) + 1 if self.prefix else 0
        files: list[StoredFile] = []
        refused: list[RefusedEntry] = []
        try:
            for obj in self.client.list_objects(self.bucket, prefix=self._key(""), recursive=True):
                if obj.is_dir or obj.object_name is None:
                    continue
                name = obj.object_name[start:]
                if unsafe_segments(name):
                    refused.append(RefusedEntry(name, "unsafe-name", "key has an empty, '.' or '..' path segment"))
                else:
                    files.append(StoredFile(name, int(obj.size or 0)))
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise FileNotFoundError(f"no such bucket: {self.bucket}") from None
            raise
        return Listing(sorted(files, key=lambda f: f.name), sorted(refused, key=lambda r: r.name))

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        if escapes(name):
            raise UnsafeName(name, "unsafe-name", "key leaves the prefix (absolute or '..')")
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
        """Upload ``local_path`` under ``name`` (atomic: S3 shows the object only once the upload completes)."""
        self.client.fput_object(self.bucket, self._key(name), str(local_path))
        return f"s3://{self.bucket}/{self._key(name)}"

    def put_bytes(self, name: str, data: bytes) -> str:
        """Upload ``data`` under ``name`` in one PUT (atomic)."""
        self.client.put_object(self.bucket, self._key(name), io.BytesIO(data), len(data))
        return f"s3://{self.bucket}/{self._key(name)}"

    def delete(self, name: str) -> None:
        """Remove an object (S3 answers success when there is none)."""
        self.client.remove_object(self.bucket, self._key(name))

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a folder: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
