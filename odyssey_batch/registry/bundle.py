"""A model version's bundle: what scoring needs to use a finetuned model, registered and loaded as one.

``register_run`` packages the best checkpoint of a finetuning run with everything its inputs depend on —
weights (``model.safetensors``), ``config.json`` (model config, training options, placement), the per-task
calibrators and thresholds (``calibration.json``), the dataset version's vocabulary and lab bins, and its task
definitions — and registers it as a candidate in ``ops.model_version``. ``load_model`` downloads a version,
verifies every file against the registry's checksum (a corrupt artifact is refused) and gives back a
``LoadedModel`` that turns prompted inputs into calibrated probabilities.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from odyssey_batch.model.classifier import EHRMambaForTasks
from odyssey_batch.registry import artifacts
from odyssey_batch.registry.versions import ModelVersion, champion, get, register, registered_from
from odyssey_batch.sequences.labs import LabBins
from odyssey_batch.sequences.store import open_dataset
from odyssey_batch.sequences.vocab import Vocabulary
from odyssey_batch.settings import Settings
from odyssey_batch.training import checkpoint
from odyssey_batch.training.checkpoint import build_model
from odyssey_batch.training.finetune import CALIBRATION_FILE, Example, best_checkpoint, predict_probabilities
from odyssey_batch.training.runs import run_state

_ATTEMPTS = 3  # downloads of a version whose files are being added to meanwhile
BUNDLE_FILES = ("model.safetensors", "config.json", CALIBRATION_FILE, "vocabulary.json", "lab_bins.json",
                "tasks.json")  # fmt: skip


def register_run(url: str, settings: Settings, run_id: int, *, extra_config: dict[str, Any] | None = None,
                 ) -> ModelVersion:  # fmt: skip
    """Register the best checkpoint of finetuning run ``run_id`` as a candidate model version; a run registered
    before gives back its version (a retried registration never adds a second candidate)."""
    kind, status = run_state(url, run_id)
    if kind != "finetune" or status != "succeeded":
        raise ValueError(f"training run {run_id} is a {status} {kind} run: only a succeeded finetuning run is a model")
    existing = registered_from(url, run_id)
    if existing is not None:
        return existing
    prefix = best_checkpoint(settings, run_id)
    if prefix is None:
        raise LookupError(f"finetuning run {run_id} has no checkpoint")
    with tempfile.TemporaryDirectory(prefix="odyssey-bundle-") as tmp:
        folder = Path(tmp)
        for name in ("model.safetensors", "config.json", CALIBRATION_FILE):  # verified: a tampered file is refused
            (folder / name).write_bytes(checkpoint.read_file(settings, prefix, name))
        meta = json.loads((folder / "config.json").read_text())
        dataset = open_dataset(url, settings, meta["dataset_version"])
        (folder / "vocabulary.json").write_text(json.dumps(dataset.manifest["vocabulary"]))
        (folder / "lab_bins.json").write_text(json.dumps(dataset.manifest["lab_bins"]))
        (folder / "tasks.json").write_text(json.dumps(dataset.manifest["tasks"]))
        current = champion(url)
        config = {
            "model": meta["model"], "options": meta["options"], "tasks": meta["tasks"],
            "placement": meta["options"]["placement"], "max_length": meta["options"]["max_length"],
            "pretrain_run_id": meta["parent_run_id"], "checkpoint": prefix, **(extra_config or {}),
        }  # fmt: skip
        return register(
            url, settings, dataset_version=meta["dataset_version"], training_run_id=run_id,
            preset=meta["options"]["preset"], config=config, files={n: folder / n for n in BUNDLE_FILES},
            parent_version=current.model_version if current else None,
        )  # fmt: skip


@dataclass
class LoadedModel:
    """A verified model version, ready to score prompted inputs."""

    version: ModelVersion
    model: EHRMambaForTasks
    meta: dict[str, Any]
    calibration: dict[str, dict]
    vocabulary: Vocabulary
    bins: LabBins
    tasks: list[str]

    @property
    def placement(self) -> str:
        return self.meta["options"]["placement"]

    @property
    def max_length(self) -> int:
        return int(self.meta["options"]["max_length"])

    @property
    def dataset_version(self) -> int:
        return int(self.meta["dataset_version"])

    def threshold(self, task: str) -> float:
        return float((self.calibration.get(task) or {}).get("threshold", 0.5))

    def probabilities(self, examples: list[Example], *, batch_size: int = 32, device=None) -> np.ndarray:
        """Calibrated probabilities of prompted inputs (built with this model's vocabulary and placement)."""
        return predict_probabilities(self.model, examples, self.calibration, batch_size,
                                     device or torch.device("cpu"))  # fmt: skip


def _fetch(url: str, settings: Settings, version: int, folder: Path) -> ModelVersion:
    """Download and verify a version's files into ``folder``; return its registry row.

    Files added to the version meanwhile (``versions.add_files``) switch its checksum and sweep what the new
    manifest no longer names, which can remove a file this download still wanted: when the checksum changed
    under a failed download, it starts again from the new one (a failure under an unchanged checksum is real).
    """
    registered = get(url, version)
    for _ in range(_ATTEMPTS - 1):
        try:
            artifacts.fetch(settings, version, folder, registered.checksum)
            return registered
        except artifacts.CorruptArtifactError:
            now = get(url, version)
            if now.checksum == registered.checksum:
                raise
            registered = now
    artifacts.fetch(settings, version, folder, registered.checksum)
    return registered


def load_model(url: str, settings: Settings, version: int) -> LoadedModel:
    """Download model ``version``, verify every file against the registry's checksum, and build it."""
    with tempfile.TemporaryDirectory(prefix="odyssey-model-") as tmp:
        folder = Path(tmp)
        registered = _fetch(url, settings, version, folder)
        meta = json.loads((folder / "config.json").read_text())
        model = build_model(meta, load_file(str(folder / "model.safetensors")))
        calibration = json.loads((folder / CALIBRATION_FILE).read_text())["tasks"]
        vocabulary = Vocabulary.from_dict(json.loads((folder / "vocabulary.json").read_text()))
        bins = LabBins.from_dict(json.loads((folder / "lab_bins.json").read_text()))
    if not isinstance(model, EHRMambaForTasks):
        raise ValueError(f"model version {version} is not a finetuned model")
    model.eval()
    return LoadedModel(registered, model, meta, calibration, vocabulary, bins, list(meta["tasks"]))
