"""Checksummed files in a location: manifest entries (sha256 and size), verified reads, safe file names.

A manifest entry is ``{"sha256": <hex>, "bytes": <size>}``, optionally with ``"object"``: the key, relative to
the manifest's folder, where the bytes are stored when that is not the file's own name. Model versions
(``registry.artifacts``) and training checkpoints (``training.checkpoint``) both describe their files this way,
and every read of such a file goes through ``read_verified`` or ``copy_verified``, so a changed, truncated or
missing file is refused with its name and both checksums, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from odyssey_batch.storage.location import Location

CHUNK = 1 << 20


class CorruptArtifactError(ValueError):
    """A stored file (or its manifest) is missing or does not match its recorded checksum."""


def sha256_file(path: Path) -> tuple[str, int]:
    """The sha256 (hex) and size of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def entry_of(path: Path) -> dict[str, Any]:
    """The manifest entry of a local file."""
    sha, size = sha256_file(path)
    return {"sha256": sha, "bytes": size}


def entry_of_bytes(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The canonical bytes of a manifest (sorted keys, so equal manifests have equal checksums)."""
    return orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def relative_name(name: str, what: str = "file") -> str:
    """``name`` when it is a clean relative path with '/' separators (no '..', no absolute path)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or str(path) != name:
        raise ValueError(f"invalid {what} name {name!r}: use a relative path with '/' separators")
    return name


def object_of(name: str, entry: dict[str, Any]) -> str:
    """Where an entry's bytes are stored, relative to the manifest's folder."""
    return relative_name(str(entry.get("object", name)))


def check(label: str, where: str, entry: dict[str, Any], sha: str, size: int) -> None:
    """Raise ``CorruptArtifactError`` unless ``sha``/``size`` are the entry's."""
    if sha != entry.get("sha256") or size != entry.get("bytes"):
        raise CorruptArtifactError(
            f"{label} at {where} is corrupt: expected sha256 {entry.get('sha256')} ({entry.get('bytes')} bytes), "
            f"found sha256 {sha} ({size} bytes)"
        )


def missing(label: str, where: str, entry: dict[str, Any], exc: Exception) -> CorruptArtifactError:
    return CorruptArtifactError(
        f"{label} is missing or unreadable at {where} (expected sha256 {entry.get('sha256')}; "
        f"{type(exc).__name__}: {exc})"
    )


def read_verified(location: Location, key: str, entry: dict[str, Any], label: str) -> bytes:
    """The bytes stored under ``key``, when they match ``entry``; ``CorruptArtifactError`` otherwise."""
    where = location.describe(key)
    try:
        with location.open(key) as fh:
            data = fh.read()
    except Exception as exc:  # a missing file, or a missing S3 object (S3Error)
        raise missing(label, where, entry, exc) from exc
    check(label, where, entry, hashlib.sha256(data).hexdigest(), len(data))
    return data


def copy_verified(location: Location, key: str, entry: dict[str, Any], label: str, target: Path) -> Path:
    """Stream ``key`` to ``target`` through a ``.part`` file renamed only once verified; return ``target``.

    ``target`` never holds unverified bytes under its real name.
    """
    where = location.describe(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(location.open(key))
        except Exception as exc:  # a missing file, or a missing S3 object (S3Error)
            raise missing(label, where, entry, exc) from exc
        try:
            digest, size = hashlib.sha256(), 0
            with partial.open("wb") as out:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            check(label, where, entry, digest.hexdigest(), size)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    os.replace(partial, target)
    return target
