"""How close finetuned EHRMamba gets to the oracle on synthetic data, beside the baselines, in one run.

    python -m benchmarks.oracle_gap [--patients 3000] [--preset tiny] [--pretrain-steps 600] [--epochs 6]
                                    [--max-length 512] [--threads 1] [--database-url URL]

Generates a synthetic export (``odyssey-batch synth``, seed ``--seed``), loads it into a fresh database (on
``--database-url``'s server, else the embedded one under a temporary ODYSSEY_HOME), validates and tokenizes it,
pretrains ``--preset`` for ``--pretrain-steps``, finetunes every task (multitask, prompt placement ``append``),
registers the model and evaluates it on the test split with ``--oracle truth.parquet`` (the hidden risk model's
true probability) and the logistic-regression and gradient-boosted-tree baselines. Prints per task the AUROC of
the model, the oracle and the baselines, the gap to the oracle, and the time of each stage; the last line is one
JSON object. The figures in the README's "Finetuning, evaluation and the model registry" come from this command.
"""

# ruff: noqa: E402
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))  # benchmarks/tokenize.py would shadow the stdlib's tokenize
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=42, help="the synthetic export's seed")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=6, help="most finetuning epochs (early stopping)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--database-url", default=os.environ.get("ODYSSEY_TEST_DATABASE_URL", ""),
                        help="a server for a scratch database (default: the embedded server)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from odyssey_batch.evaluation.evaluate import EvaluateOptions, evaluate_model
    from odyssey_batch.ingest import ingest
    from odyssey_batch.quality.gate import validate
    from odyssey_batch.registry.bundle import register_run
    from odyssey_batch.sequences.dataset import tokenize
    from odyssey_batch.settings import Settings
    from odyssey_batch.synth import generate
    from odyssey_batch.training.finetune import FinetuneOptions, finetune
    from odyssey_batch.training.pretrain import PretrainOptions, pretrain
    from odyssey_batch.warehouse import create_database, drop_database, upgrade, with_database
    from odyssey_batch.warehouse import embedded as embedded_server

    seconds: dict[str, float] = {}

    def stage(name: str, fn):
        print(f"{name} ...", file=sys.stderr)
        started = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - started, 1)
        return result

    with tempfile.TemporaryDirectory(prefix="odyssey-oracle-gap-") as tmp:
        home = Path(tmp)
        settings = Settings(home=home)
        admin = args.database_url or with_database(embedded_server.start(settings), "postgres")
        name = f"odyssey_oracle_gap_{uuid.uuid4().hex[:8]}"
        create_database(admin, name)
        url = with_database(admin, name)
        try:
            upgrade(url)
            stage("synth", lambda: generate(home / "export", args.patients, args.seed))
            run = stage("ingest", lambda: ingest(str(home / "export"), settings, url=url)).run_id
            stage("validate", lambda: validate(url, settings, run, data_docs=False))
            stage("tokenize", lambda: tokenize(url, settings))
            options = PretrainOptions(preset=args.preset, max_length=args.max_length, steps=args.pretrain_steps,
                                      batch_size=16, lr=args.lr, seed=args.train_seed)  # fmt: skip
            parent = stage("pretrain", lambda: pretrain(url, settings, None, options)).training_run_id
            tuning = FinetuneOptions(
                max_length=args.max_length, batch_size=32, epochs=args.epochs, lr=args.lr, seed=args.train_seed
            )
            tuned = stage("finetune", lambda: finetune(url, settings, parent, tuning))
            version = register_run(url, settings, tuned.training_run_id).model_version
            evaluation = stage("evaluate", lambda: evaluate_model(
                url, settings, version, EvaluateOptions(oracle=str(home / "export" / "truth.parquet"))))  # fmt: skip
        finally:
            drop_database(admin, name)
            if not args.database_url:
                embedded_server.stop(settings)
    auroc = {(r["task"], r["method"]): r["auroc"] for r in evaluation.table}
    tasks = sorted({task for task, _ in auroc})
    result = {
        "patients": args.patients, "preset": args.preset, "pretrain_steps": args.pretrain_steps,
        "finetune_epochs": tuned.epochs, "best_epoch": tuned.best_epoch, "max_length": args.max_length,
        "threads": args.threads, "test_points": evaluation.points,
        "auroc": {t: {m: round(auroc[(t, m)], 3) for m in ("model", "oracle", "logreg", "gbt") if auroc.get((t, m))}
                  for t in tasks},
        "gap_to_oracle": {t: round(auroc[(t, "oracle")] - auroc[(t, "model")], 3) for t in tasks},
        "seconds": seconds,
    }  # fmt: skip
    for t in tasks:
        row = result["auroc"][t]
        print(
            f"{t:22} model {row['model']:.3f}  oracle {row['oracle']:.3f}  gap {result['gap_to_oracle'][t]:.3f}  "
            f"logreg {row.get('logreg', float('nan')):.3f}  gbt {row.get('gbt', float('nan')):.3f}",
            file=sys.stderr,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
