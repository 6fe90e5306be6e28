"""``odyssey-batch train finetune``: multitask prompted finetuning (MPF) from a pretraining run.

One dataset of prediction points from the dataset version's labels (``label`` not NULL): each input is the
patient's sequence cut at the prediction time (the tokens known then, most recent ``max_length − 1``), followed
by the task's token ``[TASK:<name>]`` timed at the prediction time. One shared head reads the last token: one
model, every task. The prompt comes last so that scoring encodes a history once and takes one recurrent step per
task. Loss: binary cross-entropy; with ``balance="tasks"`` every task weighs the same in each epoch's loss
however many points it has. Validation loss after each epoch; the best epoch is kept and training stops after
``patience`` epochs without improvement.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from odyssey_batch.model.classifier import EHRMambaForTasks
from odyssey_batch.model.ssm import backend_name
from odyssey_batch.sequences.grammar import TokenType, task_token
from odyssey_batch.sequences.store import open_dataset
from odyssey_batch.sequences.tokens import STREAM_DTYPES, STREAMS, window
from odyssey_batch.settings import Settings
from odyssey_batch.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from odyssey_batch.training.data import Streams, collate, length_batches, load_sequences
from odyssey_batch.training.pretrain import Progress, lr_lambda, parameter_groups
from odyssey_batch.training.runs import fail_run, finish_run, start_run, update_run

DAY = 86400.0


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
    preset: str = ""  # from the pretraining run
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class Example:
    streams: Streams
    task: str
    label: float
    weight: float = 1.0


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prompt(streams: Streams, cut: int, token_id: int, when_days: float, max_length: int) -> Streams:
    """The history known at the prediction time (``cut`` tokens), then the task token at that time."""
    history = window(streams, cut, max_length - 1)
    age = float(history["ages"][-1]) + (when_days - float(history["times"][-1])) / 365.25
    task = {"token_ids": token_id, "type_ids": int(TokenType.TASK), "ages": age, "times": when_days,
            "visit_orders": int(history["visit_orders"][-1]), "visit_segments": 0}  # fmt: skip
    return {
        name: np.concatenate([history[name], np.array([task[name]], dtype=STREAM_DTYPES[name])]) for name in STREAMS
    }


def task_examples(dataset, split: str, tasks: list[str], max_length: int) -> list[Example]:
    """The labelled prediction points of ``split`` as prompted inputs."""
    ids, rows = load_sequences(dataset, split)
    sequences = dict(zip(ids, rows, strict=True))
    labels = dataset.labels().to_pandas()
    labels = labels[(labels.split == split) & labels.label.notna() & labels.task.isin(tasks)]
    vocab = dataset.vocabulary
    token_ids = {t: vocab.id(task_token(t)) for t in tasks}
    examples = []
    for row in labels.itertuples():
        when = row.prediction_time.timestamp() / DAY
        streams = prompt(sequences[row.patient_id], int(row.cut), token_ids[row.task], when, max_length)
        examples.append(Example(streams, row.task, float(row.label)))
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
def validate_tasks(model, examples: list[Example], batch_size: int, device) -> tuple[float, dict[str, float | None]]:
    """Mean (unweighted) validation loss, and AUROC per task (None when a task has one class only)."""
    from sklearn.metrics import roc_auc_score

    model.eval()
    scores, total = [], 0.0
    for batch in length_batches([len(e.streams["token_ids"]) for e in examples], batch_size, 0, 0):
        chosen = [examples[i] for i in batch]
        logits, labels, _, _ = _batch(model, chosen, device)
        total += float(F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="sum"))
        scores += [(e.task, e.label, float(s)) for e, s in zip(chosen, torch.sigmoid(logits).tolist(), strict=True)]
    model.train()
    auroc: dict[str, float | None] = {}
    for task in sorted({t for t, _, _ in scores}):
        y = [label for t, label, _ in scores if t == task]
        p = [s for t, _, s in scores if t == task]
        auroc[task] = round(float(roc_auc_score(y, p)), 4) if 0 < sum(y) < len(y) else None
    return total / max(len(examples), 1), auroc


def finetune(
    url: str, settings: Settings, pretrained: int, options: FinetuneOptions, *, progress: Progress | None = None
) -> FinetuneResult:
    """Finetune the last checkpoint of pretraining run ``pretrained`` on every task (or ``options.tasks``)."""
    prefix = latest_checkpoint(settings, pretrained)
    if prefix is None:
        raise LookupError(f"training run {pretrained} has no checkpoint to finetune from")
    backbone, meta, _ = load_checkpoint(settings, prefix, trainer=False)
    dataset = open_dataset(url, settings, meta["dataset_version"])
    all_tasks = [t["name"] for t in dataset.manifest["tasks"]["tasks"]]
    tasks = list(options.tasks) or all_tasks
    unknown = sorted(set(tasks) - set(all_tasks))
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the dataset has {', '.join(all_tasks)}")
    options = FinetuneOptions(**{**asdict(options), "tasks": tuple(tasks), "preset": meta["options"]["preset"]})
    train = task_examples(dataset, "train", tasks, options.max_length)
    validation = task_examples(dataset, "validation", tasks, options.max_length)
    if not train or not validation:
        raise ValueError("finetuning needs labelled points in the train and validation splits")
    balance(train, options.balance)
    points = {
        split: dict(sorted(Counter(e.task for e in examples).items()))
        for split, examples in (("train", train), ("validation", validation))
    }

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(options.seed)
    model = EHRMambaForTasks(backbone).to(device)
    lengths = [len(e.streams["token_ids"]) for e in train]
    per_epoch = math.ceil(len(train) / options.batch_size)
    total = per_epoch * options.epochs
    optimizer = torch.optim.AdamW(parameter_groups(model, options.weight_decay), lr=options.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, options.warmup, options.min_lr_ratio))
    backend = backend_name(device)
    run_id = start_run(url, "finetune", dataset.version, options, backend, device, 1, model, parent=pretrained)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))  # fmt: skip
    run_meta = {
        "dataset_version": dataset.version, "vocab_size": len(dataset.vocabulary), "kind": "finetune",
        "options": asdict(options), "backend": backend, "tasks": tasks, "parent_run_id": pretrained,
    }  # fmt: skip
    started, step, tokens = time.perf_counter(), 0, 0
    best = (math.inf, 0, {}, "")  # validation loss, epoch, AUROC per task, artifact
    epoch = 0
    try:
        for epoch in range(1, options.epochs + 1):
            for batch in length_batches(lengths, options.batch_size, options.seed, epoch):
                with autocast:
                    logits, labels, weights, n = _batch(model, [train[i] for i in batch], device)
                loss = (F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none") * weights).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step, tokens = step + 1, tokens + n
                if progress is not None:
                    progress(step, total, float(loss), tokens / max(time.perf_counter() - started, 1e-9))
            val_loss, auroc = validate_tasks(model, validation, options.batch_size, device)
            if val_loss < best[0]:
                trainer = {"step": step, "epoch": epoch, "val_loss": val_loss, "val_auroc": auroc}
                artifact = save_checkpoint(settings, run_id, step, model, {**run_meta, "val_auroc": auroc}, trainer)
                best = (val_loss, epoch, auroc, artifact)
                update_run(url, run_id, step, tokens, tokens / (time.perf_counter() - started), val_loss, artifact)
            elif epoch - best[1] >= options.patience:
                break
    except BaseException as exc:
        fail_run(url, run_id, exc)
        raise
    seconds = time.perf_counter() - started
    finish_run(url, run_id, step, tokens, tokens / seconds, best[0], best[0], best[3])
    return FinetuneResult(run_id, pretrained, epoch, best[1], step, round(best[0], 5), best[2], points,
                          tokens / seconds, best[3], backend, str(device), round(seconds, 2))  # fmt: skip
