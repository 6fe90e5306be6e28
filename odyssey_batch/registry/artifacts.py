"""Model artifacts in the object store: ``models/v<N>/`` holds the model's files and its manifests.

A manifest lists every file of a version with its sha256 and size. It is content-addressed: stored as
``manifest-<sha256 of the manifest>.json`` and never overwritten, and the registry row names it
(``ops.model_version.checksum``), so loading always finds exactly the manifest the registry committed and
checks every file against it. A file changed after publishing is caught when it is read.

Adding files to a registered version (an evaluation report) never touches what the committed manifest names:

1. each new file goes under a key no committed manifest refers to: its own name when the version has no file
   of that name yet, else ``by-sha256/<sha256>/<name>`` (content-addressed, so rewriting it writes the same
   bytes);
2. the new manifest goes under its own content-addressed name;
3. the caller commits the new checksum in the registry row (``versions.add_files``), the one switch from the
   old manifest to the new one;
4. only then, under the row's lock, ``sweep`` removes what the committed manifest no longer names (the old
   manifest, replaced files, leftovers of an add that died before its commit).

A kill at any point before 3 leaves the committed manifest and every file it names as they were; a kill
between 3 and 4 leaves unreferenced objects that the next add to the version sweeps. Every single write is
atomic (``storage.location``). Versions registered before content-addressed manifests keep their
``manifest.json``; it is read (verified against the registry's checksum) when ``manifest-<sha>.json`` is absent,
and swept after the version's next add.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from odyssey_batch.settings import Settings
from odyssey_batch.storage import Location, open_location
from odyssey_batch.storage.checksums import (
    CorruptArtifactError,
    copy_verified,
    entry_of,
    manifest_bytes,
    object_of,
    read_verified,
    relative_name,
)

__all__ = ["CorruptArtifactError", "add", "fetch", "manifest", "publish", "read", "sweep", "where"]

LEGACY_MANIFEST = "manifest.json"  # the single, rewritten manifest of versions registered before this layout
REPLACED = "by-sha256"  # the folder of files that replaced a file of the same name


def prefix(version: int) -> str:
    """The folder of a model version, relative to the object store."""
    return f"models/v{version}"


def manifest_name(checksum: str) -> str:
    """The name of the manifest whose sha256 is ``checksum`` (what the registry row records)."""
    if len(checksum) != 64 or any(c not in "0123456789abcdef" for c in checksum):
        raise ValueError(f"not a sha256 checksum: {checksum!r}")
    return f"manifest-{checksum}.json"


def _check_name(name: str) -> str:
    relative_name(name, "model file")
    if name == LEGACY_MANIFEST or (name.startswith("manifest-") and "/" not in name):
        raise ValueError(f"{name!r}: manifests are written by the registry and cannot be published as model files")
    if name.split("/", 1)[0] == REPLACED:
        raise ValueError(f"{name!r}: the {REPLACED}/ folder is the registry's own")
    return name


def _put_files(location: Location, version: int, files: dict[str, Path], current: dict[str, Any]) -> dict:
    """Store ``files`` where nothing in the ``current`` manifest's files points; return their entries."""
    for name in files:
        _check_name(name)
    entries = {}
    for name in sorted(files):
        local = Path(files[name])
        entry = entry_of(local)
        known = current.get(name)
        if known is not None and (known["sha256"], known["bytes"]) == (entry["sha256"], entry["bytes"]):
            entries[name] = known  # the same bytes are already stored
            continue
        if known is not None:
            entry["object"] = f"{REPLACED}/{entry['sha256']}/{name}"
        location.put_file(f"{prefix(version)}/{object_of(name, entry)}", local)
        entries[name] = entry
    return entries


def _put_manifest(location: Location, version: int, manifest: dict[str, Any]) -> str:
    data = manifest_bytes(manifest)
    checksum = hashlib.sha256(data).hexdigest()
    location.put_bytes(f"{prefix(version)}/{manifest_name(checksum)}", data)
    return checksum


def publish(settings: Settings, version: int, files: dict[str, Path]) -> tuple[str, str]:
    """Copy ``files`` (stored name → local path) to ``models/v<version>/`` and write the manifest last.

    Returns the folder's URI and the sha256 of the manifest (what ``ops.model_version`` records).
    """
    if not files:
        raise ValueError(f"model v{version}: nothing to publish")
    location = open_location(settings.object_store_location, settings)
    entries = _put_files(location, version, files, {})
    checksum = _put_manifest(location, version, {"model_version": version, "files": entries})
    return location.describe(prefix(version)), checksum


def _load_manifest(location: Location, version: int, checksum: str) -> tuple[dict[str, Any], bytes, str]:
    """The manifest the registry's ``checksum`` names, its bytes and its key; ``CorruptArtifactError`` when
    it is missing, differs, or describes another model."""
    key = f"{prefix(version)}/{manifest_name(checksum)}"
    try:
        with location.open(key) as fh:
            data = fh.read()
    except Exception as first:  # a missing file, or a missing S3 object (S3Error): try the legacy name
        key = f"{prefix(version)}/{LEGACY_MANIFEST}"
        try:
            with location.open(key) as fh:
                data = fh.read()
        except Exception:
            where = location.describe(f"{prefix(version)}/{manifest_name(checksum)}")
            raise CorruptArtifactError(
                f"model v{version}: its manifest {manifest_name(checksum)} is missing or unreadable at {where} "
                f"({first})"
            ) from first
    where = location.describe(key)
    actual = hashlib.sha256(data).hexdigest()
    if actual != checksum:
        raise CorruptArtifactError(
            f"model v{version}: manifest at {where} has sha256 {actual}, the registry expects {checksum}"
        )
    try:
        found = orjson.loads(data)
        files = found["files"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptArtifactError(f"model v{version}: {where} is not a model manifest") from exc
    if found.get("model_version") != version or not isinstance(files, dict):
        raise CorruptArtifactError(f"model v{version}: the manifest at {where} describes another model")
    return found, data, key


def manifest(settings: Settings, version: int, *, expected_manifest_checksum: str) -> dict[str, Any]:
    """The manifest of a model version, verified against the registry's checksum."""
    location = open_location(settings.object_store_location, settings)
    return _load_manifest(location, version, expected_manifest_checksum)[0]


def add(settings: Settings, version: int, files: dict[str, Path], *, expected_manifest_checksum: str) -> str:
    """Add files to a published model (an evaluation report written later) under a new manifest.

    A file of the same name is replaced (in the new manifest; its old bytes stay until ``sweep``). Nothing the
    manifest ``expected_manifest_checksum`` names is written over. Returns the new manifest's sha256, which the
    registry must commit (``versions.add_files`` does both, then sweeps).
    """
    if not files:
        raise ValueError(f"model v{version}: no files to add")
    location = open_location(settings.object_store_location, settings)
    current = _load_manifest(location, version, expected_manifest_checksum)[0]
    current["files"].update(_put_files(location, version, files, current["files"]))
    return _put_manifest(location, version, current)


def sweep(settings: Settings, version: int, checksum: str) -> list[str]:
    """Remove from ``models/v<version>/`` every object the manifest ``checksum`` (the committed one) does not
    name; return the removed names. Call it holding the registry row's lock, so no add is under way."""
    location = open_location(settings.object_store_location, settings)
    found, _, manifest_key = _load_manifest(location, version, checksum)  # never sweep on an unreadable manifest
    keep = {manifest_key} | {f"{prefix(version)}/{object_of(n, e)}" for n, e in found["files"].items()}
    folder = open_location(f"{settings.object_store_location.rstrip('/')}/{prefix(version)}", settings)
    removed = []
    for stored in folder.list_files():
        key = f"{prefix(version)}/{stored.name}"
        if key not in keep:
            location.delete(key)
            removed.append(stored.name)
    return removed


def _entry(found: dict[str, Any], version: int, name: str) -> dict[str, Any]:
    entry = found["files"].get(name)
    if entry is None:
        known = ", ".join(sorted(found["files"])) or "none"
        raise LookupError(f"model v{version} has no file {name!r} (files: {known})")
    return entry


def where(settings: Settings, version: int, names: list[str], *, expected_manifest_checksum: str) -> dict[str, str]:
    """Where each named model file's bytes are stored (a path or an ``s3://`` URI), for links in reports."""
    location = open_location(settings.object_store_location, settings)
    found = _load_manifest(location, version, expected_manifest_checksum)[0]
    return {
        name: location.describe(f"{prefix(version)}/{object_of(name, _entry(found, version, name))}") for name in names
    }


def read(settings: Settings, version: int, name: str, *, expected_manifest_checksum: str) -> bytes:
    """The verified bytes of one model file.

    Raises ``CorruptArtifactError`` when the manifest or the file is missing or differs from its checksum, and
    ``LookupError`` when the manifest lists no such file.
    """
    location = open_location(settings.object_store_location, settings)
    entry = _entry(_load_manifest(location, version, expected_manifest_checksum)[0], version, name)
    key = f"{prefix(version)}/{object_of(name, entry)}"
    return read_verified(location, key, entry, f"model v{version}: {name}")


def fetch(settings: Settings, version: int, folder: Path, checksum: str) -> Path:
    """Download every file of a model version into ``folder`` (with its manifest), verifying each; return it.

    ``checksum`` is the registry's sha256 of the manifest. A file is written under a temporary name and renamed
    once verified, so ``folder`` never holds a corrupt file under its real name. The manifest is saved as
    ``manifest.json`` in ``folder``.
    """
    location = open_location(settings.object_store_location, settings)
    found, raw, _ = _load_manifest(location, version, checksum)
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(found["files"]):
        entry = found["files"][name]
        key = f"{prefix(version)}/{object_of(name, entry)}"
        copy_verified(location, key, entry, f"model v{version}: {name}", folder / _check_name(name))
    (folder / "manifest.json").write_bytes(raw)
    return folder
