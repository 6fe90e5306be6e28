"""Checkpoints in the object store: ``training/run-<id>/step-<NNNNNNNN>/`` holds ``model.safetensors`` (the
weights), ``config.json`` (model config, training options, dataset version, vocabulary size), the trainer state
that a resumed run needs (optimizer, schedule, random state, step) as ``trainer.safetensors`` (its tensors) plus
``trainer.json`` (the rest, see ``training.state``), and ``manifest.json``: the sha256 and size of each file,
written after them. ``latest.json`` in the run's folder names the newest complete checkpoint; it is written
last, so a crash mid-write leaves the previous checkpoint in charge.

Nothing in a checkpoint is a pickle, and every file read from one is verified against its manifest first: a
changed byte is refused with the file's name and both checksums (``CorruptArtifactError``), whether the reader is
a resumed run, finetuning, evaluation, forecasting or the registry copying a checkpoint into a model version. A
checkpoint without a manifest (written by a version of odyssey-batch that pickled its trainer state into
``trainer.pt``) cannot be resumed or registered, and its ``trainer.pt`` is never unpickled; its weights and
config (safetensors and JSON: data only) can still be read, unverified, to finetune, evaluate or forecast.

A file added to a checkpoint later (finetuning's ``calibration.json`` in its best checkpoint) is stored first
and the manifest rewritten with its entry after (``add_files``); both writes are atomic, and a reader checks
only the files it reads, so a crash between them leaves every other file of the checkpoint readable.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import orjson
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from odyssey_batch.model.config import ModelConfig
from odyssey_batch.model.ehrmamba import EHRMamba
from odyssey_batch.settings import Settings
from odyssey_batch.storage import Location, open_location
from odyssey_batch.storage.checksums import (
    CorruptArtifactError,
    entry_of,
    entry_of_bytes,
    manifest_bytes,
    read_verified,
    relative_name,
)
from odyssey_batch.training import state as trainer_state

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"
LEGACY_TRAINER = "trainer.pt"  # the pickled trainer state of checkpoints written before checksums: never loaded

log = logging.getLogger(__name__)


def run_prefix(run_id: int) -> str:
    return f"training/run-{run_id}"


def save_checkpoint(
    settings: Settings, run_id: int, step: int, model: torch.nn.Module, meta: dict[str, Any], trainer: dict[str, Any]
) -> str:
    """Store a checkpoint (files, then its manifest, then ``latest.json``); return the checkpoint's folder."""
    location = open_location(settings.object_store_location, settings)
    prefix = f"{run_prefix(run_id)}/step-{step:08d}"
    with tempfile.TemporaryDirectory(prefix="odyssey-ckpt-") as tmp:
        folder = Path(tmp)
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps({"model": model.config.as_dict(), **meta}, indent=2))
        structure, tensors = trainer_state.encode(trainer)
        save_file(tensors, folder / TRAINER_TENSORS)
        (folder / TRAINER_STATE).write_text(json.dumps(structure, allow_nan=False))
        entries = {}
        for name in (WEIGHTS, CONFIG, TRAINER_TENSORS, TRAINER_STATE):
            entries[name] = entry_of(folder / name)
            location.put_file(f"{prefix}/{name}", folder / name)
    location.put_bytes(f"{prefix}/{MANIFEST}", manifest_bytes({"step": step, "files": entries}))
    location.put_bytes(f"{run_prefix(run_id)}/latest.json", json.dumps({"step": step, "prefix": prefix}).encode())
    return location.describe(prefix)


def _read(settings: Settings, name: str) -> bytes:
    location = open_location(settings.object_store_location, settings)
    with location.open(name) as fh:
        return fh.read()


def latest_checkpoint(settings: Settings, run_id: int) -> str | None:
    try:
        return json.loads(_read(settings, f"{run_prefix(run_id)}/latest.json"))["prefix"]
    except Exception:  # no checkpoint yet (a missing file or S3 object)
        return None


def _manifest(location: Location, prefix: str) -> dict[str, Any]:
    """A checkpoint's manifest; ``CorruptArtifactError`` when it is missing or unreadable."""
    where = location.describe(prefix)
    try:
        with location.open(f"{prefix}/{MANIFEST}") as fh:
            data = fh.read()
    except Exception as exc:  # a missing file, or a missing S3 object (S3Error)
        raise CorruptArtifactError(
            f"checkpoint {where} has no readable {MANIFEST}: it was written without checksums (by an older "
            f"odyssey-batch, whose pickled trainer.pt is never loaded) or is damaged; refused "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    try:
        found = orjson.loads(data)
        files = found["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
            raise TypeError("files is not a mapping of entries")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptArtifactError(f"checkpoint {where}: {MANIFEST} is not a checkpoint manifest ({exc})") from exc
    return found


def _verified(location: Location, prefix: str, files: dict[str, dict[str, Any]] | None, name: str) -> bytes:
    """A checkpoint file checked against the manifest's ``files`` (None: an older checkpoint's weights or
    config, read as they are)."""
    if files is None:
        with location.open(f"{prefix}/{name}") as fh:
            return fh.read()
    entry = files.get(name)
    if entry is None:
        raise CorruptArtifactError(
            f"checkpoint {location.describe(prefix)}: {name} is not in its {MANIFEST} "
            f"(files: {', '.join(sorted(files)) or 'none'}); refused"
        )
    return read_verified(location, f"{prefix}/{name}", entry, f"checkpoint file {name}")


def _exists(location: Location, key: str) -> bool:
    try:
        with location.open(key):
            return True
    except Exception:  # a missing file, or a missing S3 object (S3Error)
        return False


def _weights_files(location: Location, prefix: str) -> dict[str, dict[str, Any]] | None:
    """The manifest's files for reading a checkpoint's weights and config; None for a checkpoint written before
    checkpoints carried checksums (``trainer.pt``, no manifest, no ``trainer.json``): its ``model.safetensors``
    and ``config.json`` are data only and are read unverified, so that a model trained before an upgrade can
    still be finetuned, evaluated or forecast from. Its ``trainer.pt`` is never loaded: it cannot be resumed,
    and the registry does not copy from it (``read_file`` has no such exception)."""
    try:
        return _manifest(location, prefix)["files"]
    except CorruptArtifactError:
        legacy = (
            not _exists(location, f"{prefix}/{MANIFEST}")
            and not _exists(location, f"{prefix}/{TRAINER_STATE}")
            and _exists(location, f"{prefix}/{LEGACY_TRAINER}")
        )
        if not legacy:
            raise
    log.warning(
        "checkpoint %s predates checkpoint checksums: its weights and config are read unverified "
        "(its pickled trainer.pt is not loaded)",
        location.describe(prefix),
    )
    return None


def read_file(settings: Settings, prefix: str, name: str) -> bytes:
    """The bytes of one checkpoint file, verified against the checkpoint's manifest."""
    location = open_location(settings.object_store_location, settings)
    return _verified(location, prefix, _manifest(location, prefix)["files"], name)


def add_files(settings: Settings, prefix: str, files: dict[str, bytes]) -> None:
    """Store ``files`` (name → bytes) in a checkpoint, then rewrite its manifest with their entries."""
    location = open_location(settings.object_store_location, settings)
    found = _manifest(location, prefix)
    for name in sorted(files):
        if relative_name(name, "checkpoint file") in (MANIFEST, WEIGHTS, CONFIG, TRAINER_TENSORS, TRAINER_STATE):
            raise ValueError(f"{name!r} is written with the checkpoint and cannot be replaced")
        location.put_bytes(f"{prefix}/{name}", files[name])
        found["files"][name] = entry_of_bytes(files[name])
    location.put_bytes(f"{prefix}/{MANIFEST}", manifest_bytes(found))


def build_model(meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model a checkpoint's ``config.json`` describes (EHRMamba, or EHRMambaForTasks when finetuned), with
    its weights."""
    model: torch.nn.Module = EHRMamba(ModelConfig.from_dict(meta["model"]))
    if meta.get("kind") == "finetune":
        from odyssey_batch.model.classifier import EHRMambaForTasks

        model = EHRMambaForTasks(model)
    model.load_state_dict(weights)
    return model


def _decoded(location: Location, prefix: str, files: dict[str, dict[str, Any]], name: str) -> Any:
    """A verified checkpoint file, parsed (JSON or safetensors: data only, nothing executable)."""
    data = _verified(location, prefix, files, name)
    try:
        return json.loads(data) if name.endswith(".json") else load_safetensors(data)
    except Exception as exc:  # its bytes match the manifest, yet it is not what the checkpoint writes
        raise CorruptArtifactError(
            f"checkpoint file {name} at {location.describe(f'{prefix}/{name}')} is not a valid "
            f"{'JSON' if name.endswith('.json') else 'safetensors'} file; refused ({type(exc).__name__}: {exc})"
        ) from exc


def load_checkpoint(settings: Settings, prefix: str, *, trainer: bool = True) -> tuple[Any, dict, dict | None]:
    """The model of a checkpoint, its config.json, and (``trainer``) the trainer state, each file verified
    against the checkpoint's manifest (``CorruptArtifactError`` naming the file otherwise)."""
    location = open_location(settings.object_store_location, settings)
    files = _manifest(location, prefix)["files"] if trainer else _weights_files(location, prefix)
    meta = _decoded(location, prefix, files, CONFIG)
    model = build_model(meta, _decoded(location, prefix, files, WEIGHTS))
    state = None
    if trainer:
        structure = _decoded(location, prefix, files, TRAINER_STATE)
        tensors = _decoded(location, prefix, files, TRAINER_TENSORS)
        try:
            state = trainer_state.decode(structure, tensors)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(
                f"checkpoint {location.describe(prefix)}: {TRAINER_STATE} does not fit {TRAINER_TENSORS} ({exc})"
            ) from exc
    return model, meta, state
