"""Streaming reads of export files, with corruption reported instead of raised.

Memory stays bounded by the chunk size: NDJSON files are read line by line through a 1 MiB buffer and handed
out in chunks of ``chunk_lines`` lines. A gzip stream that is corrupt or truncated yields every line before
the damage, then a ``ReadProblem`` that says where reading stopped.

Two limits bound what a hostile or broken file can cost (``ODYSSEY_MAX_RESOURCE_BYTES``,
``ODYSSEY_MAX_FILE_BYTES``), both counted in uncompressed bytes while streaming, so a gzip bomb is stopped after
reading the limit, not after expanding:
- a line longer than the resource limit is never held whole: its first ``KEPT_PREFIX`` bytes are kept, the rest
  is skipped up to the next newline, and the line is handed out as ``TooLarge`` (to quarantine as ``too-large``);
- a file larger than the file limit yields the lines that lie wholly within the limit, then a ``ReadProblem``
  (``file-too-large``) naming the first line not read; the lines before it load, as with a truncated gzip;
- a JSON document is parsed in one piece, so one larger than the resource limit (or the file limit, if that is
  smaller) is refused as ``too-large`` after reading one byte past the limit.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

_BOM = b"\xef\xbb\xbf"
_READ_ERRORS = (OSError, EOFError, zlib.error)
KEPT_PREFIX = 4096  # bytes of an over-long line kept in the quarantine, enough to see its type and id
_SKIP_BYTES = 1 << 20  # read size while skipping the rest of an over-long line


@dataclass(frozen=True)
class ReadProblem:
    line_no: int  # first line that could not be read
    reason: str
    message: str


@dataclass(frozen=True)
class TooLarge:
    """A line over the resource limit, in place of its bytes: the first bytes and the whole line's size."""

    prefix: bytes
    size: int  # bytes of the line without its newline (up to where the file limit stopped reading)
    limit: int


class CountingReader(io.RawIOBase):
    """Passes reads through and reports how many bytes went by (for progress bars)."""

    def __init__(self, stream: BinaryIO, on_bytes: Callable[[int], None] | None):
        self.stream = stream
        self.on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if self.on_bytes is not None and n:
            self.on_bytes(n)
        return n


def open_stream(stream: BinaryIO, gzipped: bool, on_bytes: Callable[[int], None] | None = None) -> BinaryIO:
    buffered = io.BufferedReader(CountingReader(stream, on_bytes), buffer_size=1 << 20)
    return gzip.GzipFile(fileobj=buffered, mode="rb") if gzipped else buffered


def _describe(exc: BaseException, gzipped: bool) -> tuple[str, str]:
    if gzipped and isinstance(exc, EOFError):
        return "corrupt-gzip", "gzip stream is truncated (ended before its end-of-stream marker)"
    if gzipped:
        return "corrupt-gzip", f"gzip stream is corrupt: {exc}"
    return "read-error", f"file could not be read: {exc}"


def iter_line_chunks(
    stream: BinaryIO, gzipped: bool, chunk_lines: int, on_bytes: Callable[[int], None] | None = None, *,
    max_line_bytes: int = 64 << 20, max_file_bytes: int = 8 << 30,
) -> Iterator[list[tuple[int, bytes | TooLarge]] | ReadProblem]:  # fmt: skip
    """Chunks of ``(line_no, line bytes or TooLarge)``; blank lines are skipped but keep their numbers."""
    chunk: list[tuple[int, bytes | TooLarge]] = []
    line_no = 0
    records = 0
    consumed = 0  # uncompressed bytes read so far
    reader = open_stream(stream, gzipped, on_bytes)
    try:
        while raw := reader.readline(max_line_bytes + 1):
            line_no += 1
            consumed += len(raw)
            item: bytes | TooLarge
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                prefix, size = raw[:KEPT_PREFIX], len(raw)
                while not raw.endswith(b"\n") and consumed <= max_file_bytes:
                    raw = reader.readline(_SKIP_BYTES)
                    if not raw:
                        break
                    size += len(raw)
                    consumed += len(raw)
                item = TooLarge(prefix, size - (1 if raw.endswith(b"\n") else 0), max_line_bytes)
            else:
                item = raw
            if consumed > max_file_bytes:
                if chunk:
                    yield chunk
                yield ReadProblem(
                    line_no,
                    "file-too-large",
                    f"file is larger than {max_file_bytes:,} bytes uncompressed (ODYSSEY_MAX_FILE_BYTES); "
                    f"line {line_no} and after were not read",
                )
                return
            if isinstance(item, bytes):
                if line_no == 1 and item.startswith(_BOM):
                    item = item[len(_BOM) :]
                if not item.strip():
                    continue
                item = item.rstrip(b"\r\n")
            records += 1
            chunk.append((line_no, item))
            if len(chunk) >= chunk_lines:
                yield chunk
                chunk = []
    except _READ_ERRORS as exc:
        if chunk:
            yield chunk
        reason, message = _describe(exc, gzipped)
        yield ReadProblem(line_no + 1, reason, f"{message}; lines after {line_no} could not be read")
        return
    if chunk:
        yield chunk
    if records == 0:
        yield ReadProblem(
            0,
            "empty-file",
            f"file holds no resources ({line_no} blank lines)" if line_no else "file is empty: it holds no resources",
        )


def read_document(
    stream: BinaryIO, gzipped: bool, on_bytes: Callable[[int], None] | None = None, max_bytes: int = 64 << 20
) -> bytes | ReadProblem:
    """The whole (decompressed) content of a JSON document file, if it is at most ``max_bytes`` long."""
    try:
        data = open_stream(stream, gzipped, on_bytes).read(max_bytes + 1)
    except _READ_ERRORS as exc:
        reason, message = _describe(exc, gzipped)
        return ReadProblem(1, reason, f"{message}; the document could not be read")
    if len(data) > max_bytes:
        return ReadProblem(
            1,
            "too-large",
            f"document is larger than {max_bytes:,} bytes uncompressed (ODYSSEY_MAX_RESOURCE_BYTES, or "
            "ODYSSEY_MAX_FILE_BYTES if smaller): a JSON document is parsed whole, so it was not loaded",
        )
    if not data.strip():
        return ReadProblem(0, "empty-file", "file is empty: it holds no resources")
    return data.removeprefix(_BOM)
