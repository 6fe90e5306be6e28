"""Scoring speed: every task of a patient in one pass vs one full pass per task.

    python -m benchmarks.score [--preset small] [--length 512] [--patients 64] [--tasks 6] [--threads 1]

Builds ``--patients`` synthetic histories of ``--length`` tokens (``benchmarks.pretrain.sequence``) and the
finetuned model's architecture ``EHRMambaForTasks(EHRMamba(preset(--preset, vocab)))`` with random weights
(speed does not depend on the weights), then scores ``--tasks`` task tokens per patient two ways, as nightly
scoring would (``odyssey_batch.scoring.scorer``): ``one_pass`` (encode each history once, then one recurrent step
per task token) and ``separate_passes`` (each task's prompt encoded in full). Checks that both give the same
logits, and reports the median over ``--repeats`` of each: patients/s, history tokens/s, and their ratio (the
issue's goal: at least 4x with six tasks). End-to-end figures of real runs (reading the warehouse, building
inputs, calibration, writing) are in ``risk.scoring_run.patients_per_s``. Progress goes to stderr; the last line
printed is one JSON object.
"""

# ruff: noqa: E402
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))  # benchmarks/tokenize.py would shadow the stdlib's tokenize
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import argparse
import json
import statistics
import time

import numpy as np
import torch

from benchmarks.pretrain import sequence
from odyssey_batch.model.classifier import EHRMambaForTasks
from odyssey_batch.model.config import PRESETS, preset
from odyssey_batch.model.ehrmamba import EHRMamba
from odyssey_batch.model.ssm import backend_name
from odyssey_batch.scoring.scorer import Request, one_pass, separate_passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--length", type=int, default=512, help="history tokens per patient")
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=6, help="task tokens scored per patient")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tasks = [f"task_{i}" for i in range(args.tasks)]
    token_ids = {t: args.vocab - 1 - i for i, t in enumerate(tasks)}  # the last ids stand for the task tokens
    model = EHRMambaForTasks(EHRMamba(preset(args.preset, args.vocab))).to(device).eval()
    requests = []
    for _ in range(args.patients):
        history = sequence(args.length, args.vocab - args.tasks, rng)
        requests.append(Request(history, float(history["times"][-1]) + 0.5, tasks))
    print(f"{args.patients} patients x {args.length} tokens, {args.tasks} tasks, preset {args.preset} "
          f"({model.num_parameters():,} parameters), scan backend {backend_name(device)}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)  # fmt: skip

    one = one_pass(model, requests[:2], token_ids, batch_size=args.batch_size, device=device)  # warm-up
    each = separate_passes(model, requests[:2], token_ids, batch_size=args.batch_size, device=device)
    agree = float(np.max(np.abs(np.concatenate(one) - np.concatenate(each))))
    times: dict[str, list[float]] = {"one_pass": [], "separate": []}
    for repeat in range(args.repeats):
        for name, fn in (("one_pass", one_pass), ("separate", separate_passes)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn(model, requests, token_ids, batch_size=args.batch_size, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
            print(f"repeat {repeat + 1}: {name} {times[name][-1]:.2f} s", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in times.items()}
    tokens = args.patients * args.length
    result = {
        "device": str(device), "backend": backend_name(device), "threads": torch.get_num_threads(),
        "preset": args.preset, "length": args.length, "patients": args.patients, "tasks": args.tasks,
        "one_pass": {"seconds": round(median["one_pass"], 3),
                     "patients_per_s": round(args.patients / median["one_pass"], 2),
                     "tokens_per_s": round(tokens / median["one_pass"], 1)},
        "separate": {"seconds": round(median["separate"], 3),
                     "patients_per_s": round(args.patients / median["separate"], 2),
                     "tokens_per_s": round(tokens / median["separate"], 1)},
        "ratio": round(median["separate"] / median["one_pass"], 2),
        "max_abs_logit_difference": agree,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
