"""Model artifacts in the object store: ``models/v<N>/`` holds the model's files and ``manifest.json``.

The manifest lists every file with its sha256 and size; it is written last, so a crash while copying leaves a
folder without a manifest, which nothing reads. The registry keeps the sha256 of the manifest itself
(``ops.model_version.checksum``), so a file changed after publishing is caught when it is read: the file no
longer matches the manifest, or the manifest no longer matches the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from odyssey_batch.settings import Settings
from odyssey_batch.storage import Location, open_location

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CorruptArtifactError(ValueError):
    """A stored model file (or its manifest) is missing or does not match its recorded checksum."""


def prefix(version: int) -> str:
    """The folder of a model version, relative to the object store."""
    return f"models/v{version}"


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _check_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or str(path) != name:
        raise ValueError(f"invalid model file name {name!r}: use a relative path with '/' separators")
    if name == MANIFEST:
        raise ValueError(f"{MANIFEST!r} is written by the registry and cannot be published as a model file")
    return name


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def _put_files(location: Location, version: int, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    for name in files:
        _check_name(name)
    entries = {}
    for name in sorted(files):
        local = Path(files[name])
        sha, size = _sha256_file(local)
        location.put_file(f"{prefix(version)}/{name}", local)
        entries[name] = {"sha256": sha, "bytes": size}
    return entries


def _put_manifest(location: Location, version: int, manifest: dict[str, Any]) -> tuple[str, str]:
    data = _manifest_bytes(manifest)
    with tempfile.TemporaryDirectory(prefix="odyssey-model-") as tmp:
        path = Path(tmp) / MANIFEST
        path.write_bytes(data)
        stored = location.put_file(f"{prefix(version)}/{MANIFEST}", path)
    folder = stored[: -len(MANIFEST)].rstrip("/\\")
    return folder, hashlib.sha256(data).hexdigest()


def publish(settings: Settings, version: int, files: dict[str, Path]) -> tuple[str, str]:
    """Copy ``files`` (stored name → local path) to ``models/v<version>/`` and write the manifest last.

    Returns the folder's URI and the sha256 of the manifest (what ``ops.model_version`` records).
    """
    if not files:
        raise ValueError(f"model v{version}: nothing to publish")
    location = open_location(settings.object_store_location, settings)
    entries = _put_files(location, version, files)
    return _put_manifest(location, version, {"model_version": version, "files": entries})


def _load_manifest(location: Location, version: int, expected_checksum: str | None) -> tuple[dict[str, Any], bytes]:
    where = location.describe(f"{prefix(version)}/{MANIFEST}")
    try:
        with location.open(f"{prefix(version)}/{MANIFEST}") as fh:
            data = fh.read()
    except Exception as exc:  # a missing file, or a missing S3 object (S3Error)
        raise CorruptArtifactError(f"model v{version}: {MANIFEST} is missing or unreadable at {where} ({exc})") from exc
    actual = hashlib.sha256(data).hexdigest()
    if expected_checksum is not None and actual != expected_checksum:
        raise CorruptArtifactError(
            f"model v{version}: {MANIFEST} at {where} has sha256 {actual}, the registry expects {expected_checksum}"
        )
    try:
        manifest = orjson.loads(data)
        files = manifest["files"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptArtifactError(f"model v{version}: {MANIFEST} at {where} is not a model manifest") from exc
    if manifest.get("model_version") != version or not isinstance(files, dict):
        raise CorruptArtifactError(f"model v{version}: {MANIFEST} at {where} describes another model")
    return manifest, data


def manifest(settings: Settings, version: int, *, expected_manifest_checksum: str | None = None) -> dict[str, Any]:
    """The manifest of a model version (verified against the registry's checksum when given)."""
    location = open_location(settings.object_store_location, settings)
    return _load_manifest(location, version, expected_manifest_checksum)[0]


def add(
    settings: Settings, version: int, files: dict[str, Path], *, expected_manifest_checksum: str | None = None
) -> str:
    """Add files to a published model (an evaluation report written later) and rewrite its manifest.

    A file of the same name is replaced. Returns the new sha256 of the manifest, which the registry must record
    (``versions.add_files`` does both).
    """
    if not files:
        raise ValueError(f"model v{version}: no files to add")
    location = open_location(settings.object_store_location, settings)
    current = _load_manifest(location, version, expected_manifest_checksum)[0]
    current["files"].update(_put_files(location, version, files))
    return _put_manifest(location, version, current)[1]


def _entry(manifest: dict[str, Any], version: int, name: str) -> dict[str, Any]:
    entry = manifest["files"].get(name)
    if entry is None:
        known = ", ".join(sorted(manifest["files"])) or "none"
        raise LookupError(f"model v{version} has no file {name!r} (files: {known})")
    return entry


def _verify(version: int, name: str, where: str, entry: dict[str, Any], sha: str, size: int) -> None:
    if sha != entry.get("sha256") or size != entry.get("bytes"):
        raise CorruptArtifactError(
            f"model v{version}: {name} at {where} is corrupt: expected sha256 {entry.get('sha256')} "
            f"({entry.get('bytes')} bytes), found sha256 {sha} ({size} bytes)"
        )


def _missing(version: int, name: str, where: str, entry: dict[str, Any], exc: Exception) -> CorruptArtifactError:
    return CorruptArtifactError(
        f"model v{version}: {name} is missing or unreadable at {where} (expected sha256 {entry.get('sha256')}; "
        f"{type(exc).__name__}: {exc})"
    )


def read(settings: Settings, version: int, name: str, *, expected_manifest_checksum: str | None = None) -> bytes:
    """The verified bytes of one model file.

    Raises ``CorruptArtifactError`` when the manifest or the file is missing or differs from its checksum, and
    ``LookupError`` when the manifest lists no such file.
    """
    location = open_location(settings.object_store_location, settings)
    entry = _entry(_load_manifest(location, version, expected_manifest_checksum)[0], version, name)
    key = f"{prefix(version)}/{name}"
    try:
        with location.open(key) as fh:
            data = fh.read()
    except Exception as exc:
        raise _missing(version, name, location.describe(key), entry, exc) from exc
    _verify(version, name, location.describe(key), entry, hashlib.sha256(data).hexdigest(), len(data))
    return data


def fetch(settings: Settings, version: int, folder: Path, checksum: str) -> Path:
    """Download every file of a model version into ``folder`` (with its manifest), verifying each; return it.

    ``checksum`` is the registry's sha256 of the manifest. A file is written under a temporary name and renamed
    once verified, so ``folder`` never holds a corrupt file under its real name.
    """
    location = open_location(settings.object_store_location, settings)
    found, raw = _load_manifest(location, version, checksum)
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(found["files"]):
        entry = found["files"][name]
        target = folder / _check_name(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        key = f"{prefix(version)}/{name}"
        with contextlib.ExitStack() as stack:
            try:
                source = stack.enter_context(location.open(key))
            except Exception as exc:  # a missing file, or a missing S3 object (S3Error)
                raise _missing(version, name, location.describe(key), entry, exc) from exc
            try:
                digest, size = hashlib.sha256(), 0
                with partial.open("wb") as out:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                _verify(version, name, location.describe(key), entry, digest.hexdigest(), size)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, target)
    (folder / MANIFEST).write_bytes(raw)
    return folder
