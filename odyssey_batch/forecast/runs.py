"""Which pretrained model forecasts: the latest succeeded pretraining run, or a chosen one, with its dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from odyssey_batch.settings import Settings

if TYPE_CHECKING:
    from odyssey_batch.model.ehrmamba import EHRMamba
    from odyssey_batch.sequences.store import Dataset


@dataclass
class Pretrained:
    run_id: int
    model: EHRMamba
    meta: dict[str, Any]
    dataset: Dataset
    max_length: int  # the run's training window: histories are cut to it


def pretrain_run(url: str, run_id: int | None = None) -> int:
    """``run_id`` checked to be a pretraining run, or the latest succeeded one."""
    from odyssey_batch.training.runs import latest_run, run_state

    if run_id is None:
        latest = latest_run(url, "pretrain")
        if latest is None:
            raise LookupError("no succeeded pretraining run: run `odyssey-batch train pretrain` first")
        return latest
    kind, _ = run_state(url, run_id)
    if kind != "pretrain":
        raise LookupError(f"training run {run_id} is a {kind} run: forecasting needs a pretraining run")
    return run_id


def load_pretrained(url: str, settings: Settings, run_id: int | None = None) -> Pretrained:
    """The model of a pretraining run's latest checkpoint (eval mode, CPU), and its dataset version."""
    from odyssey_batch.sequences.store import open_dataset
    from odyssey_batch.training.checkpoint import latest_checkpoint, load_checkpoint

    run_id = pretrain_run(url, run_id)
    prefix = latest_checkpoint(settings, run_id)
    if prefix is None:
        raise LookupError(f"training run {run_id} has no checkpoint in the object store")
    model, meta, _ = load_checkpoint(settings, prefix, trainer=False)
    model.eval()
    dataset = open_dataset(url, settings, meta["dataset_version"])
    if len(dataset.vocabulary) != model.config.vocab_size:
        raise LookupError(
            f"run {run_id}'s model has {model.config.vocab_size} tokens but dataset version {dataset.version} "
            f"has {len(dataset.vocabulary)}"
        )
    return Pretrained(run_id, model, meta, dataset, int(meta["options"]["max_length"]))
