"""``odyssey-batch train pretrain``: next-token pretraining of EHRMamba on a dataset version.

Every window of every training-split sequence is a training example (``data.pretraining_examples``); batches
group similar lengths; the loss is next-token cross-entropy with ``[PAD]`` targets masked out. AdamW (no decay
on biases, norms and the SSM's A, D and dt bias), linear warm-up then linear decay to a floor, gradient
clipping, bf16 autocast on GPU. Checkpoints go to the object store every ``checkpoint_every`` steps and at the
end; ``resume`` continues a run from its last checkpoint and ends exactly where an uninterrupted run would
(same batches, same random state). Under ``torchrun`` each process takes its share of every batch and
DistributedDataParallel averages the gradients; rank 0 writes checkpoints and the warehouse row.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from odyssey_batch.model.config import preset
from odyssey_batch.model.ehrmamba import EHRMamba
from odyssey_batch.model.ssm import backend_name
from odyssey_batch.sequences.store import open_dataset
from odyssey_batch.settings import Settings
from odyssey_batch.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from odyssey_batch.training.data import collate, length_batches, load_sequences, pretraining_examples
from odyssey_batch.training.runs import fail_run, finish_run, resume_run, start_run, update_run
from odyssey_batch.warehouse.liveness import heartbeat

Progress = Callable[[int, int, float, float], None]  # step, total steps, loss, tokens/s


@dataclass(frozen=True)
class PretrainOptions:
    preset: str = "small"
    max_length: int = 2048
    batch_size: int = 8
    epochs: float = 1.0
    steps: int = 0  # when set, overrides epochs
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps
    min_lr_ratio: float = 0.01
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    val_batches: int = 20
    model: dict[str, Any] = field(default_factory=dict)  # model config overrides


@dataclass
class PretrainResult:
    training_run_id: int
    steps: int
    tokens: int
    tokens_per_s: float
    train_loss: float
    val_loss: float | None
    artifact_uri: str
    backend: str
    device: str
    parameters: int
    seconds: float
    finished: bool = True
    excluded: dict[str, int] = field(default_factory=dict)  # what the quality gate left out of its dataset

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def next_token_loss(model: torch.nn.Module, streams: dict[str, torch.Tensor], lengths: torch.Tensor):
    """Mean cross-entropy of each real token predicted from the tokens before it; [PAD] is never a target."""
    mask = torch.arange(streams["token_ids"].shape[1], device=lengths.device)[None, :] < lengths[:, None]
    hidden = model(streams, mask)
    core = model.module if hasattr(model, "module") else model
    targets = streams["token_ids"][:, 1:]
    valid = mask[:, 1:] & (targets != core.config.pad_token_id)
    logits = core.logits(hidden[:, :-1][valid])
    return F.cross_entropy(logits.float(), targets[valid]), int(valid.sum())


def parameter_groups(model: EHRMamba, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", False) or p.ndim < 2 or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total: int, warmup: float, floor: float) -> Callable[[int], float]:
    """Linear warm-up from ``floor`` to 1 over ``warmup`` of the steps, then linear decay to ``floor``."""
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return floor + (1 - floor) * step / warm
        return max(floor, 1 - (1 - floor) * (step - warm) / max(1, total - warm))

    return factor


def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pretrain(
    url: str,
    settings: Settings,
    dataset_version: int | None,
    options: PretrainOptions,
    *,
    resume: int | None = None,
    progress: Progress | None = None,
    stop_after: int | None = None,
    run_key: str | None = None,
) -> PretrainResult:
    """Pretrain (or, with ``resume``, continue run ``resume``). ``stop_after`` ends the process's work after
    that many steps as a crash would (for tests): the run stays ``running`` with its last checkpoint."""
    rank, world = _distributed()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    state = None
    if resume is not None:
        prefix = latest_checkpoint(settings, resume)
        if prefix is None:
            raise LookupError(f"training run {resume} has no checkpoint to resume from")
        model, meta, state = load_checkpoint(settings, prefix)
        options = PretrainOptions(**meta["options"])
        dataset_version = meta["dataset_version"]
        run_id = resume
    dataset = open_dataset(url, settings, dataset_version)
    _, train = load_sequences(dataset, "train")
    _, validation = load_sequences(dataset, "validation")
    examples = pretraining_examples(train, options.max_length)
    if not examples:
        raise ValueError(f"dataset version {dataset.version} has no training sequences")
    lengths = [len(e["token_ids"]) for e in examples]
    per_epoch = math.ceil(len(examples) / options.batch_size)
    total = options.steps or max(1, math.ceil(options.epochs * per_epoch))

    torch.manual_seed(options.seed)
    if state is None:
        model = EHRMamba(preset(options.preset, len(dataset.vocabulary), **options.model))
    model.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, options.weight_decay), lr=options.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, options.warmup, options.min_lr_ratio))
    step, tokens, recent = 0, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        step, tokens, recent = state["step"], state["tokens"], state["recent"]
    backend = backend_name(device)
    meta = {"dataset_version": dataset.version, "vocab_size": len(dataset.vocabulary), "options": asdict(options),
            "backend": backend, "kind": "pretrain"}  # fmt: skip
    if resume is None and rank == 0:
        run_id = start_run(url, "pretrain", dataset.version, options, backend, device, world, model, run_key=run_key,
                           stale_run_minutes=settings.stale_run_minutes)  # fmt: skip
    elif rank == 0:
        resume_run(url, run_id)
    if world > 1:
        ids = torch.tensor([run_id if rank == 0 else 0], device=device)
        dist.broadcast(ids, 0)
        run_id = int(ids.item())
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    started, step_tokens, artifact = time.perf_counter(), 0, ""
    model.train()
    pulse = heartbeat(url, settings, ("training", run_id)).start() if rank == 0 else None
    try:
        while step < total:
            epoch, position = divmod(step, per_epoch)
            batch = length_batches(lengths, options.batch_size, options.seed, epoch)[position]
            share = batch[rank::world] or batch[:1]
            streams, lens = collate([examples[i] for i in share], device)
            with autocast:
                loss, count = next_token_loss(trained, streams, lens)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if world > 1:  # every process's real tokens
                counted = torch.tensor([count], device=device)
                dist.all_reduce(counted)
                count = int(counted.item())
            tokens += count
            step_tokens += count
            recent = [*recent[-49:], float(loss.detach())]
            rate = step_tokens / max(time.perf_counter() - started, 1e-9)
            if progress is not None and rank == 0:
                progress(step, total, sum(recent) / len(recent), rate)
            if rank == 0 and (step % options.checkpoint_every == 0 or step == total):
                trainer = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                           "rng": torch.get_rng_state(), "step": step, "tokens": tokens, "recent": recent}  # fmt: skip
                artifact = save_checkpoint(settings, run_id, step, model, meta, trainer)
                update_run(url, run_id, step, tokens, rate, sum(recent) / len(recent), artifact)
            if stop_after is not None and step >= stop_after and step < total:
                return PretrainResult(run_id, step, tokens, rate, sum(recent) / len(recent), None, artifact,
                                      backend, str(device), model.num_parameters(),
                                      time.perf_counter() - started, finished=False,
                                      excluded=dataset.excluded)  # fmt: skip
        val_loss = evaluate(model, validation, options, device) if rank == 0 else None
    except BaseException as exc:
        if rank == 0:
            fail_run(url, run_id, exc)
        raise
    finally:
        if pulse is not None:
            pulse.stop()
        if world > 1 and dist.is_initialized():
            dist.barrier()
    seconds = time.perf_counter() - started
    rate = step_tokens / max(seconds, 1e-9)
    train_loss = sum(recent) / len(recent) if recent else math.nan
    if rank == 0:
        finish_run(url, run_id, step, tokens, rate, train_loss, val_loss, artifact)
    return PretrainResult(run_id, step, tokens, rate, train_loss, val_loss, artifact, backend, str(device),
                          model.num_parameters(), seconds, excluded=dataset.excluded)  # fmt: skip


@torch.no_grad()
def evaluate(model: EHRMamba, sequences: list, options: PretrainOptions, device: torch.device) -> float | None:
    """Mean next-token loss on (up to ``val_batches`` batches of) validation windows."""
    examples = pretraining_examples(sequences, options.max_length)
    if not examples:
        return None
    model.eval()
    batches = length_batches([len(e["token_ids"]) for e in examples], options.batch_size, options.seed, 0)
    total, count = 0.0, 0
    for batch in batches[: options.val_batches]:
        streams, lens = collate([examples[i] for i in batch], device)
        loss, n = next_token_loss(model, streams, lens)
        total += float(loss) * n
        count += n
    model.train()
    return total / count if count else None
