"""Streaming reads of export files, with corruption reported instead of raised.

Memory stays bounded by the chunk size: NDJSON files are read line by line through a 1 MiB buffer and handed
out in chunks of ``chunk_lines`` lines. A gzip stream that is corrupt or truncated yields every line before
the damage, then a ``ReadProblem`` that says where reading stopped.
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


@dataclass(frozen=True)
class ReadProblem:
    line_no: int  # first line that could not be read
    reason: str
    message: str


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
    stream: BinaryIO, gzipped: bool, chunk_lines: int, on_bytes: Callable[[int], None] | None = None
) -> Iterator[list[tuple[int, bytes]] | ReadProblem]:
    """Chunks of ``(line_no, line bytes)``; blank lines are skipped but keep their numbers."""
    chunk: list[tuple[int, bytes]] = []
    line_no = 0
    records = 0
    reader = open_stream(stream, gzipped, on_bytes)
    try:
        for raw in reader:
            line_no += 1
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            records += 1
            chunk.append((line_no, raw.rstrip(b"\r\n")))
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
    stream: BinaryIO, gzipped: bool, on_bytes: Callable[[int], None] | None = None
) -> bytes | ReadProblem:
    """The whole (decompressed) content of a JSON document file."""
    try:
        data = open_stream(stream, gzipped, on_bytes).read()
    except _READ_ERRORS as exc:
        reason, message = _describe(exc, gzipped)
        return ReadProblem(1, reason, f"{message}; the document could not be read")
    if not data.strip():
        return ReadProblem(0, "empty-file", "file is empty: it holds no resources")
    return data.removeprefix(_BOM)
