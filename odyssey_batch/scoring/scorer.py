"""Logits of every task of a patient from one history pass (the reason prompts end with the task token).

A ``Request`` is one patient's history at one prediction time and the tasks to score there. ``one_pass``
encodes each history once (``prefill``, batched by length), copies its recurrent state once per task
(``InferenceCache.select``) and takes one recurrent step per task token: six tasks cost about one pass.
``separate_passes`` encodes every prompt in full, once per task — what a model with the task token anywhere
else would need; tests hold the two equal and ``benchmarks/score.py`` measures the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from odyssey_batch.model.classifier import EHRMambaForTasks
from odyssey_batch.sequences.tokens import STREAMS
from odyssey_batch.training.data import Streams, collate
from odyssey_batch.training.finetune import task_token_streams, with_task_token

Progress = Callable[[int], None]


@dataclass
class Request:
    history: Streams  # the model input before the task token: at most max_length − 1 tokens
    when_days: float  # the prediction time (the task token's time)
    tasks: list[str]


def _batches(requests: list[Request], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].history["token_ids"]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def one_pass(model: EHRMambaForTasks, requests: list[Request], token_ids: dict[str, int], *, batch_size: int = 64,
             device: torch.device | str = "cpu", progress: Progress | None = None) -> list[np.ndarray]:  # fmt: skip
    """Per request, the logit of each of its tasks (in its order): one history pass, one step per task."""
    model.eval()
    out: list[np.ndarray] = [np.zeros(0)] * len(requests)
    for batch in _batches(requests, batch_size):
        chosen = [requests[i] for i in batch]
        streams, lengths = collate([r.history for r in chosen], device)
        _, cache = model.backbone.prefill(streams, lengths)
        rows = [row for row, r in enumerate(chosen) for _ in r.tasks]
        if not rows:
            continue
        tokens = [task_token_streams(r.history, token_ids[t], r.when_days) for r in chosen for t in r.tasks]
        stepped, _ = collate(tokens, device)
        step = {name: stepped[name][:, 0] for name in STREAMS}
        logits = model.score_tasks(cache.select(torch.tensor(rows, device=device)), step).float().cpu().numpy()
        start = 0
        for i, r in zip(batch, chosen, strict=True):
            out[i] = logits[start : start + len(r.tasks)].astype(np.float64)
            start += len(r.tasks)
        if progress is not None:
            progress(len(batch))
    return out


@torch.no_grad()
def separate_passes(model: EHRMambaForTasks, requests: list[Request], token_ids: dict[str, int], *,
                    batch_size: int = 64, device: torch.device | str = "cpu") -> list[np.ndarray]:  # fmt: skip
    """The same logits, each task's prompt encoded in full."""
    model.eval()
    prompts = []
    for i, r in enumerate(requests):
        for j, t in enumerate(r.tasks):
            prompts.append((i, j, with_task_token(r.history, token_ids[t], r.when_days)))
    out = [np.zeros(len(r.tasks)) for r in requests]
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k][2]["token_ids"]))
    for start in range(0, len(order), batch_size):
        chosen = [prompts[k] for k in order[start : start + batch_size]]
        streams, lengths = collate([p for _, _, p in chosen], device)
        logits = model(streams, lengths).float().cpu().numpy()
        for (i, j, _), logit in zip(chosen, logits, strict=True):
            out[i][j] = float(logit)
    return out
