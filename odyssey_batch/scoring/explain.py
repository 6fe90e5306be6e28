"""Why a score is high: integrated gradients (IG) over the concept embeddings, and the top contributing events.

For one prompted input (a history followed by its task token), let c (L, d_model) be its concept embeddings (the
``word_embeddings`` rows of its tokens, the part of each input embedding that says *which* event it is) and c′ a
baseline. IG attributes the logit difference f(c) − f(c′) to the tokens:

    attribution_t = Σ_d (c − c′)_td · ∫₀¹ ∂f/∂c_td (c′ + α (c − c′)) dα

The integral is the trapezoid rule over ``steps`` evenly spaced α ∈ [0, 1], all of them one batch of ``steps``
rows through one forward and one backward pass. Completeness: Σ_t attribution_t ≈ f(c) − f(c′), more closely
the more steps (``Attribution.completeness_error`` measures it).

Baseline (``"zero"``): the zero concept vector for every token *except the task tokens* (the final token, and
any other ``TokenType.TASK`` token, as the ``replace`` placement puts one first), which keep their own. The path
then changes what the history's events are and never the question asked: the baseline is "this task, about a
patient whose visits and events happened at the same times but say nothing", and task tokens get attribution 0.

Why the concept embeddings and not the whole input embedding (the output of ``EHRMamba._embed``, which
``EHRMambaForTasks.input_embeddings`` and ``logits_from_embeddings`` expose, and which IG here still runs
through): that embedding ends in a LayerNorm and the first block reads it through an RMSNorm, which is scale
invariant, RMSNorm(α·x) = RMSNorm(x) once α·rms(x) ≫ √eps. On the straight line from a zero input embedding the
model's output therefore jumps within α ≈ 0.001–0.003 and is flat after (measured on a trained tiny model: logit
−9.9 at α = 0.001, +10.1 at 0.003, +10.2 from 0.01 to 1); an evenly spaced integral misses the jump
(completeness errors of 20–330 logits) and the ranking is noise. The concept vectors enter before the
embedding's own projection and LayerNorm, so the path stays smooth (errors ~1% of the gap with 32 steps).

Gradients are taken with respect to the interpolated concept vectors only: the model runs in eval mode (dropout
off) with every parameter's ``requires_grad`` switched off for the call, and both are restored afterwards.
On CPU the result is deterministic; on CUDA the scan kernels' backward may differ in the last bits.

Cost: each explained input takes one forward and one backward pass of a batch of ``steps`` rows, roughly
3 × ``steps`` times the cost of scoring it (and ``steps`` × the activation memory), which is why nightly
scoring explains only the scores above a configured band.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from odyssey_batch.model.classifier import EHRMambaForTasks
from odyssey_batch.sequences.grammar import EVENT_KINDS, TokenType
from odyssey_batch.training.data import Streams, collate

BASELINES = ("zero",)
CONCEPT_TYPES = frozenset(int(kind) for kind in EVENT_KINDS)  # condition, procedure, medication, lab (6–9)


@dataclass(frozen=True)
class Attribution:
    """IG of one input: its logit f(c), the baseline's logit f(c′) and one attribution per token."""

    logit: float
    baseline_logit: float
    attributions: np.ndarray  # (L,) float64

    @property
    def gap(self) -> float:
        """f(c) − f(c′): what the attributions should sum to (completeness)."""
        return self.logit - self.baseline_logit

    @property
    def completeness_error(self) -> float:
        """|Σ attributions − gap|: the error of the integral's approximation (falls as ``steps`` grows)."""
        return abs(float(self.attributions.sum()) - self.gap)


@contextmanager
def _frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; the previous mode and flags restored after."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _kept(type_ids: np.ndarray) -> np.ndarray:
    """Tokens the baseline keeps as they are: the task tokens and the final token (the prompt)."""
    kept = np.asarray(type_ids) == TokenType.TASK
    kept[-1] = True
    return kept


@contextmanager
def _concepts_replaced(model: EHRMambaForTasks, concepts: torch.Tensor) -> Iterator[None]:
    """Within the block, the concept-embedding lookup returns ``concepts`` (batch, L, d_model) instead."""
    lookup = model.backbone.embeddings.word_embeddings

    def replace(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape != concepts.shape:
            raise ValueError(f"concepts of shape {tuple(concepts.shape)} for a lookup of {tuple(output.shape)}")
        return concepts.to(output.dtype)

    handle = lookup.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def attribute(model: EHRMambaForTasks, streams: Streams, *, steps: int = 32, baseline: str = "zero") -> Attribution:
    """Integrated gradients of one prompted input (numpy streams, the task token last); see the module doc."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {baseline!r}")
    if steps < 2:
        raise ValueError(f"the trapezoid rule needs at least 2 steps, got {steps}")
    length = len(streams["token_ids"])
    if length < 1:
        raise ValueError("cannot explain an empty input")
    device = next(model.parameters()).device
    with _frozen_eval(model):
        batch, lengths = collate([streams], device)
        with torch.no_grad():
            c = model.backbone.embeddings.word_embeddings(batch["token_ids"].long())[0].float()  # (L, d)
            kept = torch.from_numpy(_kept(streams["type_ids"])).to(device)
            c0 = torch.where(kept[:, None], c, torch.zeros_like(c))
        alphas = torch.linspace(0.0, 1.0, steps, device=device, dtype=c.dtype)
        path = (c0 + alphas[:, None, None] * (c - c0)).requires_grad_(True)  # (steps, L, d)
        rows = {name: values.expand(steps, -1) for name, values in batch.items()}
        mask = torch.ones(steps, length, dtype=torch.bool, device=device)
        with torch.enable_grad(), _concepts_replaced(model, path):
            embeddings = model.input_embeddings(rows)
            logits = model.logits_from_embeddings(embeddings, mask, lengths.expand(steps))  # (steps,)
            (gradients,) = torch.autograd.grad(logits.sum(), path)
        weights = torch.full((steps,), 1.0 / (steps - 1), device=device, dtype=torch.float64)
        weights[[0, -1]] /= 2  # trapezoid rule over [0, 1]
        mean_gradient = (weights[:, None, None] * gradients.double()).sum(0)  # (L, d)
        attributions = ((c - c0).double() * mean_gradient).sum(-1)
        logits = logits.detach()
    return Attribution(float(logits[-1]), float(logits[0]), attributions.cpu().numpy())


def integrated_gradients(
    model: EHRMambaForTasks, streams: Streams, *, steps: int = 32, baseline: str = "zero"
) -> tuple[float, np.ndarray]:
    """The logit of one prompted input and one IG attribution per token (``attribute`` also gives the baseline's
    logit, to check completeness)."""
    result = attribute(model, streams, steps=steps, baseline=baseline)
    return result.logit, result.attributions


def top_events(
    streams: Streams, attributions: np.ndarray, k: int = 5, *, positive_only: bool = True
) -> list[tuple[int, float]]:
    """The k concept tokens (condition, procedure, medication, lab) of largest attribution, as (position,
    attribution) by rank; ties go to the later (more recent) position. Only positive ones unless told."""
    attributions = np.asarray(attributions, dtype=np.float64)
    types = np.asarray(streams["type_ids"])
    if len(types) != len(attributions):
        raise ValueError(f"{len(attributions)} attributions for {len(types)} tokens")
    candidates = [i for i in range(len(types)) if int(types[i]) in CONCEPT_TYPES]
    if positive_only:
        candidates = [i for i in candidates if attributions[i] > 0]
    candidates.sort(key=lambda i: (-attributions[i], -i))
    return [(i, float(attributions[i])) for i in candidates[:k]]


def explain_batch(
    model: EHRMambaForTasks, inputs: list[Streams], k: int = 5, steps: int = 32
) -> list[list[tuple[int, float]]]:
    """``top_events`` of each input. Costs one forward and one backward pass of ``steps`` rows per input (about
    3 × ``steps`` scorings): explain only the scores worth explaining."""
    return [top_events(s, integrated_gradients(model, s, steps=steps)[1], k) for s in inputs]
