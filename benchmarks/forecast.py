"""Generation speed: continuing a history with the recurrent state vs re-encoding the sequence for every token.

    python -m benchmarks.forecast [--preset small] [--length 512] [--steps 64] [--rows 10] [--threads 1]

Builds one synthetic history of ``--length`` tokens (``benchmarks.pretrain.sequence``) and the model
``EHRMamba(preset(--preset, vocab))`` with random weights (speed does not depend on the weights), then generates
``--steps`` tokens greedily two ways: ``recurrent`` (``odyssey_batch.forecast.generate``: one prefill, then one
O(1) step per token) and ``re_encode`` (the whole history plus the tokens so far encoded again for each new
token: O(length) per token). Checks that both choose the same tokens, and also times ``--rows`` sampled
continuations advanced together (as ``evaluate-forecast`` samples a visit). Reports the median over
``--repeats`` of each: generated tokens/s and the speed-up. Progress goes to stderr; the last line printed is
one JSON object.
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
from odyssey_batch.forecast.generate import TokenTable, _masked, _State, as_streams, generate, sample
from odyssey_batch.model.config import PRESETS, preset
from odyssey_batch.model.ehrmamba import EHRMamba
from odyssey_batch.model.ssm import backend_name
from odyssey_batch.sequences.grammar import SPECIAL_TOKENS
from odyssey_batch.sequences.vocab import Vocabulary
from odyssey_batch.training.data import collate


def re_encode(model: EHRMamba, history: dict[str, np.ndarray], vocabulary: Vocabulary, steps: int) -> list[int]:
    """Greedy generation by encoding the whole sequence again for every new token."""
    table = TokenTable(vocabulary)
    state = _State(history)
    streams = {k: np.array(v) for k, v in history.items()}
    chosen = []
    with torch.no_grad():
        for _ in range(steps):
            batch, _ = collate([streams])
            logits = model.logits(model(batch)[:, -1])
            token = int(_masked(logits, table).argmax(-1)[0])
            chosen.append(token)
            new = state.advance(np.array([token]), table)
            streams = {k: np.concatenate([streams[k], new[k].astype(streams[k].dtype)]) for k in streams}
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--length", type=int, default=512, help="history tokens")
    parser.add_argument("--steps", type=int, default=64, help="generated tokens")
    parser.add_argument("--rows", type=int, default=10, help="sampled continuations advanced together")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.length < 2 or args.steps < 1 or args.rows < 1 or args.vocab <= len(SPECIAL_TOKENS):
        parser.error("--length must be at least 2, --steps and --rows at least 1, --vocab above the special tokens")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vocabulary = Vocabulary(
        (*SPECIAL_TOKENS, *(f"cond:SYN:{i}" for i in range(args.vocab - len(SPECIAL_TOKENS)))), min_count=1
    )
    model = EHRMamba(preset(args.preset, args.vocab)).eval()
    history = sequence(args.length, args.vocab, rng)

    def timed(fn) -> tuple[float, object]:
        times, out = [], None
        for i in range(args.repeats):
            started = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - started)
            print(f"  repeat {i + 1}: {times[-1]:.3f} s", file=sys.stderr)
        return statistics.median(times), out

    print(f"recurrent: {args.steps} tokens after {args.length}", file=sys.stderr)
    recurrent_s, generated = timed(lambda: generate(model, history, vocabulary, steps=args.steps, temperature=0))
    print("re-encode", file=sys.stderr)
    naive_s, naive = timed(lambda: re_encode(model, history, vocabulary, args.steps))
    same = [g.token_id for g in generated] == naive  # type: ignore[union-attr]
    print(f"sampled: {args.rows} rows", file=sys.stderr)
    rows_s, _ = timed(lambda: sample(model, history, vocabulary, steps=args.steps, rows=args.rows, seed=args.seed))
    full = as_streams(history, generated)  # type: ignore[arg-type]
    result = {
        "benchmark": "forecast",
        "preset": args.preset,
        "parameters": model.num_parameters(),
        "history_tokens": args.length,
        "generated_tokens": args.steps,
        "final_length": len(full["token_ids"]),
        "threads": args.threads,
        "backend": backend_name(torch.device("cpu")),
        "recurrent_s": round(recurrent_s, 4),
        "recurrent_tokens_per_s": round(args.steps / recurrent_s, 1),
        "re_encode_s": round(naive_s, 4),
        "re_encode_tokens_per_s": round(args.steps / naive_s, 1),
        "speedup": round(naive_s / recurrent_s, 2),
        "same_tokens": same,
        "sampled_rows": args.rows,
        "sampled_s": round(rows_s, 4),
        "sampled_tokens_per_s": round(args.rows * args.steps / rows_s, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
