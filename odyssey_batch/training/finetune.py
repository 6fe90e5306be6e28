"""``odyssey-batch train finetune``: multitask prompted finetuning (MPF) from a pretraining run.

One dataset of prediction points from the dataset version's labels (``label`` not NULL), each input the
patient's sequence cut at the prediction time with a task token ``[TASK:<name>]`` prompting the task. One shared
head reads the last token: one model, every task. Two prompt placements:

* ``append`` (default): the history known at the prediction time (most recent ``max_length − 1`` tokens), then
  the task token timed at the prediction time. Every input ends with its prompt, so scoring encodes a history
  once and takes one recurrent step per task.
* ``replace`` (the reference design's): the task token replaces the first token (``[CLS]``) and, when the cut
  history ends with one, the final ``[REG]``; inputs cut inside a visit carry the prompt at the start only.

Loss: binary cross-entropy; with ``balance="tasks"`` every task weighs the same in each epoch's loss however
many points it has. Validation loss after each epoch; the best epoch is kept and training stops after
``patience`` epochs without improvement. Each epoch ends with a checkpoint (weights, optimizer, schedule, random
state), so a killed run continues with ``resume`` and ends where an uninterrupted one would. Finally a calibrator
per task (isotonic or Platt) is fitted on the validation scores of the best epoch, with the threshold that
maximizes F1 there; both are stored with the checkpoint (``calibration.json``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit

from odyssey_batch.evaluation.calibration import Calibrator
from odyssey_batch.evaluation.metrics import best_f1_threshold
from odyssey_batch.model import default_device
from odyssey_batch.model.classifier import EHRMambaForTasks
from odyssey_batch.model.ssm import backend_name
from odyssey_batch.sequences.grammar import TokenType, task_token
from odyssey_batch.sequences.store import open_dataset
from odyssey_batch.sequences.tokens import STREAM_DTYPES, STREAMS, window
from odyssey_batch.settings import Settings
from odyssey_batch.storage import open_location
from odyssey_batch.training.checkpoint import (
    add_files,
    latest_checkpoint,
    load_checkpoint,
    read_file,
    run_prefix,
    save_checkpoint,
)
from odyssey_batch.training.data import Streams, collate, length_batches, load_sequences
from odyssey_batch.training.pretrain import Progress, lr_lambda, parameter_groups
from odyssey_batch.training.runs import fail_run, finish_run, resume_run, start_run, update_run
from odyssey_batch.warehouse.liveness import heartbeat

DAY = 86400.0
PLACEMENTS = ("append", "replace")
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class FinetuneOptions:
    tasks: tuple[str, ...] = ()  # empty: every task of the dataset version
    max_length: int = 2048
    batch_size: int = 16
    epochs: int = 3
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    min_lr_ratio: float = 0.01
    clip: float = 1.0
    seed: int = 0
    balance: str = "tasks"  # "tasks": every task weighs the same; "none": every point weighs the same
    patience: int = 2
    placement: str = "append"  # "append" (task token after the history) or "replace" (the reference design's)
    calibration: str = "platt"  # or "isotonic" (which ties scores: it can cost AUROC on small validation sets)
    preset: str = ""  # from the pretraining run
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class Example:
    streams: Streams
    task: str
    label: float
    weight: float = 1.0
    patient_id: str = ""
    prediction_time: float = 0.0  # days since the epoch


@dataclass
class FinetuneResult:
    training_run_id: int
    parent_run_id: int
    epochs: int
    best_epoch: int
    steps: int
    val_loss: float
    val_auroc: dict[str, float | None]
    points: dict[str, dict[str, int]]
    tokens_per_s: float
    artifact_uri: str
    backend: str
    device: str
    seconds: float
    placement: str = "append"
    checkpoint: str = ""  # the best checkpoint's prefix in the object store
    finished: bool = True
    excluded: dict[str, int] = field(default_factory=dict)  # what the quality gate left out of its dataset

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prompt(streams: Streams, cut: int, token_id: int, when_days: float, max_length: int,
           placement: str = "append") -> Streams:  # fmt: skip
    """The model input of one prediction point: the history known at the prediction time (``cut`` tokens) with
    the task token placed as ``placement`` says."""
    if placement == "replace":
        history = {name: values.copy() for name, values in window(streams, cut, max_length).items()}
        ends = [0, len(history["token_ids"]) - 1] if history["type_ids"][-1] == TokenType.REG else [0]
        for i in ends:
            history["token_ids"][i], history["type_ids"][i] = token_id, int(TokenType.TASK)
        return history
    if placement != "append":
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    return with_task_token(window(streams, cut, max_length - 1), token_id, when_days)


def with_task_token(history: Streams, token_id: int, when_days: float) -> Streams:
    """``history`` followed by the task token at the prediction time (placement ``append``)."""
    task = task_token_streams(history, token_id, when_days)
    return {name: np.concatenate([history[name], task[name]]) for name in STREAMS}


def task_token_streams(history: Streams, token_id: int, when_days: float) -> Streams:
    """The streams of one task token appended to ``history`` at the prediction time (arrays of length 1): the age
    carried forward to that time, the last visit's order, no segment."""
    age = float(history["ages"][-1]) + (when_days - float(history["times"][-1])) / 365.25
    task = {"token_ids": token_id, "type_ids": int(TokenType.TASK), "ages": age, "times": when_days,
            "visit_orders": int(history["visit_orders"][-1]), "visit_segments": 0}  # fmt: skip
    return {name: np.array([task[name]], dtype=STREAM_DTYPES[name]) for name in STREAMS}


def task_examples(dataset, split: str, tasks: list[str], max_length: int, placement: str = "append",
                  *, sequences: dict[str, Streams] | None = None) -> list[Example]:  # fmt: skip
    """The labelled prediction points of ``split`` as prompted inputs (``sequences``: the split's streams by
    patient, when already loaded)."""
    if sequences is None:
        ids, rows = load_sequences(dataset, split)
        sequences = dict(zip(ids, rows, strict=True))
    labels = dataset.labels().to_pandas()
    labels = labels[(labels.split == split) & labels.label.notna() & labels.task.isin(tasks)]
    vocab = dataset.vocabulary
    token_ids = {t: vocab.id(task_token(t)) for t in tasks}
    examples = []
    for row in labels.itertuples():
        when = row.prediction_time.timestamp() / DAY
        streams = prompt(sequences[row.patient_id], int(row.cut), token_ids[row.task], when, max_length, placement)
        examples.append(Example(streams, row.task, float(row.label), patient_id=row.patient_id, prediction_time=when))
    return examples


def balance(examples: list[Example], how: str) -> None:
    """Per-example loss weights: equal per task (mean weight 1), or all 1."""
    if how == "none":
        return
    if how != "tasks":
        raise ValueError(f"balance must be 'tasks' or 'none', not {how!r}")
    counts = Counter(e.task for e in examples)
    for e in examples:
        e.weight = len(examples) / (len(counts) * counts[e.task])


def _batch(model, examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    streams, lengths = collate([e.streams for e in examples], device)
    logits = model(streams, lengths)
    labels = torch.tensor([e.label for e in examples], device=device)
    weights = torch.tensor([e.weight for e in examples], device=device)
    return logits, labels, weights, int(lengths.sum())


@torch.no_grad()
def predict_logits(model, examples: list[Example], batch_size: int, device) -> np.ndarray:
    """The model's logit for every example, in the examples' order."""
    was_training = model.training
    model.eval()
    out = np.zeros(len(examples), dtype=np.float64)
    for batch in length_batches([len(e.streams["token_ids"]) for e in examples], batch_size, 0, 0):
        streams, lengths = collate([examples[i].streams for i in batch], device)
        out[batch] = model(streams, lengths).float().cpu().numpy()
    model.train(was_training)
    return out


def validate_tasks(model, examples: list[Example], batch_size: int, device) -> tuple[float, dict[str, float | None]]:
    """Mean (unweighted) validation loss, and AUROC per task (None when a task has one class only)."""
    from odyssey_batch.evaluation.metrics import metric

    logits = predict_logits(model, examples, batch_size, device)
    labels = np.array([e.label for e in examples])
    loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels)))
    tasks = np.array([e.task for e in examples])
    auroc = {}
    for task in sorted(set(tasks.tolist())):
        value = metric("auroc", labels[tasks == task], logits[tasks == task])
        auroc[task] = None if value is None else round(value, 4)
    return loss, auroc


def fit_calibration(examples: list[Example], probabilities: np.ndarray, method: str) -> dict[str, dict]:
    """Per task: a calibrator fitted on validation probabilities, and the threshold that maximizes F1 on the
    calibrated scores. A task with one class in validation keeps its raw scores (no calibrator, threshold 0.5)."""
    labels = np.array([e.label for e in examples])
    tasks = np.array([e.task for e in examples])
    out: dict[str, dict] = {}
    for task in sorted(set(tasks.tolist())):
        y, p = labels[tasks == task], probabilities[tasks == task]
        if not 0 < y.sum() < len(y):
            out[task] = {"calibrator": None, "threshold": 0.5, "points": len(y)}
            continue
        calibrator = Calibrator.fit(p, y, method)
        out[task] = {"calibrator": calibrator.as_dict(), "threshold": best_f1_threshold(y, calibrator(p)),
                     "points": len(y)}  # fmt: skip
    return out


def predict_probabilities(model, examples: list[Example], calibration: dict[str, dict], batch_size: int,
                          device) -> np.ndarray:  # fmt: skip
    """Calibrated probabilities of prompted inputs: the model's logits, sigmoid, each task's calibrator."""
    raw = expit(predict_logits(model.to(device), examples, batch_size, device))
    return calibrate(calibration, [e.task for e in examples], raw)


def calibrate(calibration: dict[str, dict], tasks: list[str], probabilities: np.ndarray) -> np.ndarray:
    """Calibrated probabilities of examples of the given tasks (raw where a task has no calibrator)."""
    out = np.asarray(probabilities, dtype=np.float64).copy()
    names = np.array(tasks)
    for task in set(tasks):
        fitted = (calibration.get(task) or {}).get("calibrator")
        if fitted:
            chosen = names == task
            out[chosen] = Calibrator.from_dict(fitted)(out[chosen])
    return out


def best_checkpoint(settings: Settings, run_id: int) -> str | None:
    """The prefix of a finetuning run's best checkpoint (its latest when the run has not finished)."""
    location = open_location(settings.object_store_location, settings)
    try:
        with location.open(f"{run_prefix(run_id)}/best.json") as fh:
            return json.loads(fh.read())["prefix"]
    except Exception:  # not finished: no best.json (a missing file or S3 object)
        return latest_checkpoint(settings, run_id)


def load_calibration(settings: Settings, prefix: str) -> dict[str, dict]:
    """A checkpoint's calibration, verified against its manifest."""
    return json.loads(read_file(settings, prefix, CALIBRATION_FILE))


def dataset_tasks(url: str, settings: Settings, pretrained: int | None) -> list[str]:
    """The tasks of the dataset version a pretraining run was trained on."""
    prefix = latest_checkpoint(settings, pretrained) if pretrained is not None else None
    if prefix is None:
        raise LookupError(f"training run {pretrained} has no checkpoint to finetune from")
    _, meta, _ = load_checkpoint(settings, prefix, trainer=False)
    return [t["name"] for t in open_dataset(url, settings, meta["dataset_version"]).manifest["tasks"]["tasks"]]


def finetune(
    url: str,
    settings: Settings,
    pretrained: int | None,
    options: FinetuneOptions,
    *,
    resume: int | None = None,
    progress: Progress | None = None,
    stop_after_epochs: int | None = None,
    run_key: str | None = None,
) -> FinetuneResult:
    """Finetune the last checkpoint of pretraining run ``pretrained`` on every task (or ``options.tasks``); or,
    with ``resume``, continue finetuning run ``resume`` from its last epoch checkpoint (same options).
    ``stop_after_epochs`` ends the work after that many epochs as a crash would (for tests)."""
    state = None
    if resume is not None:
        prefix = latest_checkpoint(settings, resume)
        if prefix is None:
            raise LookupError(f"finetuning run {resume} has no checkpoint to resume from")
        model, meta, state = load_checkpoint(settings, prefix)
        if meta.get("kind") != "finetune":
            raise ValueError(f"training run {resume} is not a finetuning run")
        options = FinetuneOptions(**{**meta["options"], "tasks": tuple(meta["options"]["tasks"])})
        pretrained = int(meta["parent_run_id"])
    else:
        if pretrained is None:
            raise ValueError("finetuning needs a pretraining run (or a finetuning run to resume)")
        prefix = latest_checkpoint(settings, pretrained)
        if prefix is None:
            raise LookupError(f"training run {pretrained} has no checkpoint to finetune from")
        backbone, meta, _ = load_checkpoint(settings, prefix, trainer=False)
        if meta.get("kind") != "pretrain":
            raise ValueError(f"training run {pretrained} is not a pretraining run")
    if options.placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {options.placement!r}")
    dataset = open_dataset(url, settings, meta["dataset_version"])
    all_tasks = [t["name"] for t in dataset.manifest["tasks"]["tasks"]]
    tasks = list(options.tasks) or all_tasks
    unknown = sorted(set(tasks) - set(all_tasks))
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the dataset has {', '.join(all_tasks)}")
    if state is None:
        options = FinetuneOptions(**{**asdict(options), "tasks": tuple(tasks), "preset": meta["options"]["preset"]})
    train = task_examples(dataset, "train", tasks, options.max_length, options.placement)
    validation = task_examples(dataset, "validation", tasks, options.max_length, options.placement)
    if not train or not validation:
        raise ValueError("finetuning needs labelled points in the train and validation splits")
    balance(train, options.balance)
    points = {
        split: dict(sorted(Counter(e.task for e in examples).items()))
        for split, examples in (("train", train), ("validation", validation))
    }

    device = default_device()
    torch.manual_seed(options.seed)
    if state is None:
        model = EHRMambaForTasks(backbone)
    model.to(device)
    lengths = [len(e.streams["token_ids"]) for e in train]
    per_epoch = math.ceil(len(train) / options.batch_size)
    total = per_epoch * options.epochs
    optimizer = torch.optim.AdamW(parameter_groups(model, options.weight_decay), lr=options.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, options.warmup, options.min_lr_ratio))
    backend = backend_name(device)
    step, tokens, epoch = 0, 0, 0
    best: dict[str, Any] = {"val_loss": math.inf, "epoch": 0, "auroc": {}, "prefix": "", "artifact": ""}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        step, tokens, epoch, best = state["step"], state["tokens"], state["epoch"], state["best"]
        run_id = resume
        resume_run(url, run_id)
    else:
        run_id = start_run(url, "finetune", dataset.version, options, backend, device, 1, model, parent=pretrained,
                           run_key=run_key, stale_run_minutes=settings.stale_run_minutes)  # fmt: skip
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))  # fmt: skip
    run_meta = {
        "dataset_version": dataset.version, "vocab_size": len(dataset.vocabulary), "kind": "finetune",
        "options": asdict(options), "backend": backend, "tasks": tasks, "parent_run_id": pretrained,
    }  # fmt: skip
    started, step_tokens = time.perf_counter(), 0
    best_state: dict[str, torch.Tensor] | None = None
    stopped = epoch > 0 and epoch - best["epoch"] >= options.patience
    pulse = heartbeat(url, settings, ("training", run_id)).start()
    try:
        model.train()
        while epoch < options.epochs and not stopped:
            epoch += 1
            for batch in length_batches(lengths, options.batch_size, options.seed, epoch):
                with autocast:
                    logits, labels, weights, n = _batch(model, [train[i] for i in batch], device)
                loss = (F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none") * weights).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step, tokens, step_tokens = step + 1, tokens + n, step_tokens + n
                if progress is not None:
                    progress(step, total, float(loss.detach()), step_tokens / max(time.perf_counter() - started, 1e-9))
            val_loss, auroc = validate_tasks(model, validation, options.batch_size, device)
            improved = val_loss < best["val_loss"]
            if improved:
                best = {"val_loss": val_loss, "epoch": epoch, "auroc": auroc, "prefix": "", "artifact": ""}
                best_state = copy.deepcopy(model.state_dict())
            stopped = epoch - best["epoch"] >= options.patience
            prefix = f"{run_prefix(run_id)}/step-{step:08d}"
            if improved:
                best["prefix"] = prefix
            trainer = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                       "rng": torch.get_rng_state(), "step": step, "tokens": tokens, "epoch": epoch,
                       "val_loss": val_loss, "val_auroc": auroc, "best": best}  # fmt: skip
            artifact = save_checkpoint(settings, run_id, step, model, {**run_meta, "val_auroc": auroc}, trainer)
            if improved:
                best["artifact"] = artifact
            rate = step_tokens / max(time.perf_counter() - started, 1e-9)
            update_run(url, run_id, step, tokens, rate, best["val_loss"], best["artifact"])
            if stop_after_epochs is not None and epoch >= stop_after_epochs and epoch < options.epochs and not stopped:
                return FinetuneResult(run_id, pretrained, epoch, best["epoch"], step, round(best["val_loss"], 5),
                                      best["auroc"], points, rate, best["artifact"], backend, str(device),
                                      round(time.perf_counter() - started, 2), options.placement, best["prefix"],
                                      finished=False, excluded=dataset.excluded)  # fmt: skip
        if best_state is None:  # resumed after the best epoch: its weights are in its checkpoint
            best_state = load_checkpoint(settings, best["prefix"], trainer=False)[0].state_dict()
        model.load_state_dict(best_state)
        probabilities = expit(predict_logits(model, validation, options.batch_size, device))
        calibration = fit_calibration(validation, probabilities, options.calibration)
        fitted = {"method": options.calibration, "placement": options.placement, "tasks": calibration}
        add_files(settings, best["prefix"], {CALIBRATION_FILE: json.dumps(fitted, indent=2).encode()})
        best_json = json.dumps({"prefix": best["prefix"], "epoch": best["epoch"]}).encode()
        open_location(settings.object_store_location, settings).put_bytes(f"{run_prefix(run_id)}/best.json", best_json)
    except BaseException as exc:
        fail_run(url, run_id, exc)
        raise
    finally:
        pulse.stop()
    seconds = time.perf_counter() - started
    rate = step_tokens / max(seconds, 1e-9)
    finish_run(url, run_id, step, tokens, rate, best["val_loss"], best["val_loss"], best["artifact"])
    return FinetuneResult(run_id, pretrained, epoch, best["epoch"], step, round(best["val_loss"], 5), best["auroc"],
                          points, rate, best["artifact"], backend, str(device), round(seconds, 2),
                          options.placement, best["prefix"], excluded=dataset.excluded)  # fmt: skip
