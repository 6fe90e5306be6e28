"""Checkpoints in the object store: ``training/run-<id>/step-<NNNNNNNN>/`` holds ``model.safetensors`` (the
weights), ``config.json`` (model config, training options, dataset version, vocabulary size) and
``trainer.pt`` (optimizer, schedule, random states, step: what a resumed run needs). ``latest.json`` in the
run's folder names the newest complete checkpoint; it is written last, so a crash mid-write leaves the previous
checkpoint in charge."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from odyssey_batch.model.config import ModelConfig
from odyssey_batch.model.ehrmamba import EHRMamba
from odyssey_batch.settings import Settings
from odyssey_batch.storage import open_location


def run_prefix(run_id: int) -> str:
    return f"training/run-{run_id}"


def save_checkpoint(
    settings: Settings, run_id: int, step: int, model: torch.nn.Module, meta: dict[str, Any], trainer: dict[str, Any]
) -> str:
    location = open_location(settings.object_store_location, settings)
    prefix = f"{run_prefix(run_id)}/step-{step:08d}"
    with tempfile.TemporaryDirectory(prefix="odyssey-ckpt-") as tmp:
        folder = Path(tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model": model.config.as_dict(), **meta}, indent=2))
        torch.save(trainer, folder / "trainer.pt")
        for name in ("model.safetensors", "config.json", "trainer.pt"):
            stored = location.put_file(f"{prefix}/{name}", folder / name)
        (folder / "latest.json").write_text(json.dumps({"step": step, "prefix": prefix}))
        location.put_file(f"{run_prefix(run_id)}/latest.json", folder / "latest.json")
    return stored.rsplit("/", 1)[0]


def _read(settings: Settings, name: str) -> bytes:
    location = open_location(settings.object_store_location, settings)
    with location.open(name) as fh:
        return fh.read()


def latest_checkpoint(settings: Settings, run_id: int) -> str | None:
    try:
        return json.loads(_read(settings, f"{run_prefix(run_id)}/latest.json"))["prefix"]
    except Exception:  # no checkpoint yet (a missing file or S3 object)
        return None


def build_model(meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model a checkpoint's ``config.json`` describes (EHRMamba, or EHRMambaForTasks when finetuned), with
    its weights."""
    model: torch.nn.Module = EHRMamba(ModelConfig.from_dict(meta["model"]))
    if meta.get("kind") == "finetune":
        from odyssey_batch.model.classifier import EHRMambaForTasks

        model = EHRMambaForTasks(model)
    model.load_state_dict(weights)
    return model


def load_checkpoint(settings: Settings, prefix: str, *, trainer: bool = True) -> tuple[Any, dict, dict | None]:
    """The model of a checkpoint, its config.json, and (``trainer``) the trainer state."""
    meta = json.loads(_read(settings, f"{prefix}/config.json"))
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(_read(settings, f"{prefix}/model.safetensors"))
        fh.flush()
        model = build_model(meta, load_file(fh.name))
    state = torch.load(io.BytesIO(_read(settings, f"{prefix}/trainer.pt")), weights_only=False) if trainer else None
    return model, meta, state
