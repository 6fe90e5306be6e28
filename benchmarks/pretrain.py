"""EHRMamba pretraining speed on CPU: training tokens per second and peak memory of one optimizer step.

    python -m benchmarks.pretrain [--preset small] [--length 512] [--batch-size 8] [--steps 10] [--threads 1]

Builds ``--sequences`` synthetic patient sequences of ``--length`` tokens in memory (the streams of
``tests/test_model.py``'s ``sequence``, over a vocabulary of ``--vocab`` tokens), the model
``EHRMamba(preset(--preset, vocab))`` and AdamW with the training code's parameter groups, then runs one warm-up
step and ``--steps`` timed steps as ``odyssey_batch.training.pretrain`` does: ``collate`` a batch of
``--batch-size`` sequences, ``next_token_loss``, backward, gradient clipping, optimizer step. No database or
object store is involved. Reports the median step time, training tokens per second (non-[PAD] target tokens over
the timed steps' time), parameters, the SSM backend, the thread count and the peak RSS (the process's, and its
growth from just before the first step). Progress goes to stderr; the last line printed is one JSON object.
"""

# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# ``python benchmarks/pretrain.py`` would put this folder first on sys.path, where benchmarks/tokenize.py shadows the
# standard library's ``tokenize``: take the folder off before importing more.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch

from odyssey_batch.model.config import PRESETS, preset
from odyssey_batch.model.ehrmamba import EHRMamba
from odyssey_batch.model.ssm import backend_name
from odyssey_batch.training.data import collate
from odyssey_batch.training.pretrain import next_token_loss, parameter_groups

FIRST_CONCEPT = 25  # token ids below this are the special tokens, as in the tests' synthetic sequences


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sequence(n: int, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One synthetic patient of n tokens: [CLS], then random concepts, visits of 5 tokens, days between events."""
    times = np.cumsum(rng.exponential(3.0, n)) + 18000.0
    return {
        "token_ids": np.concatenate([[3], rng.integers(FIRST_CONCEPT, vocab, n - 1)]).astype(np.int32),
        "type_ids": np.concatenate([[1], rng.integers(2, 10, n - 1)]).astype(np.int8),
        "ages": (40 + (times - times[0]) / 365.25).astype(np.float32),
        "times": times,
        "visit_orders": np.minimum(np.arange(n) // 5, 700).astype(np.int32),
        "visit_segments": (np.arange(n) // 5 % 2 + 1).astype(np.int8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps, after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--sequences", type=int, default=64, help="synthetic sequences, cycled through in batches")
    parser.add_argument("--vocab", type=int, default=700, help="vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.length < 2 or args.batch_size < 1 or args.steps < 1 or args.threads < 1 or args.sequences < 1:
        parser.error("--length must be at least 2, --batch-size, --steps, --threads and --sequences at least 1")
    if args.vocab <= FIRST_CONCEPT:
        parser.error(f"--vocab must be above {FIRST_CONCEPT}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    sequences = [sequence(args.length, args.vocab, rng) for _ in range(args.sequences)]
    device = torch.device("cpu")
    model = EHRMamba(preset(args.preset, args.vocab)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=5e-4, betas=(0.9, 0.95))
    backend = backend_name(device)
    params = model.num_parameters()
    c = model.config
    print(
        f"preset {args.preset}: d_model {c.d_model}, {c.n_layers} layers, d_state {c.d_state}, {params:,} parameters; "
        f"batch {args.batch_size} × {args.length} tokens, vocab {args.vocab}, backend {backend}, "
        f"threads {torch.get_num_threads()}",
        file=sys.stderr,
    )

    def step(index: int) -> tuple[float, int, float]:
        first = index * args.batch_size
        batch = [sequences[(first + i) % len(sequences)] for i in range(args.batch_size)]
        started = time.perf_counter()
        streams, lengths = collate(batch, device)
        loss, count = next_token_loss(model, streams, lengths)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, count, float(loss.detach())

    rss_before = rss_mb()
    warmup, _, first_loss = step(0)
    print(f"warm-up step: {warmup:.2f} s, loss {first_loss:.3f}", file=sys.stderr)
    seconds, counts, losses = [], [], []
    for i in range(1, args.steps + 1):
        took, count, loss = step(i)
        seconds.append(took)
        counts.append(count)
        losses.append(loss)
        print(f"step {i}: {took:.2f} s, {count / took:,.0f} tokens/s, loss {loss:.3f}", file=sys.stderr)
    median = statistics.median(seconds)
    tokens_per_s = sum(counts) / sum(seconds)
    peak = peak_rss_mb()
    print(
        f"median step {median:.2f} s, {tokens_per_s:,.0f} training tokens/s, peak RSS {peak:,.0f} MB "
        f"(+{peak - rss_before:,.0f} MB over the {rss_before:,.0f} MB before the first step)",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "preset": args.preset,
                "d_model": c.d_model,
                "layers": c.n_layers,
                "parameters": params,
                "vocab_size": args.vocab,
                "length": args.length,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "step_seconds": round(median, 4),
                "all_step_seconds": [round(s, 4) for s in seconds],
                "warmup_seconds": round(warmup, 4),
                "tokens_per_step": round(statistics.mean(counts), 1),
                "tokens_per_s": round(tokens_per_s, 1),
                "tokens_per_s_median_step": round(statistics.median(counts) / median, 1),
                "peak_rss_mb": round(peak, 1),
                "rss_before_mb": round(rss_before, 1),
                "peak_rss_growth_mb": round(peak - rss_before, 1),
                "first_loss": round(first_loss, 4),
                "last_loss": round(losses[-1], 4),
                "backend": backend,
                "threads": args.threads,
                "device": str(device),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
