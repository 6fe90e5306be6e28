"""retrain: pretrain (or reuse the latest pretraining), finetune every task, evaluate, register, promote by rule.

Weekly, or triggered by hand with params: ``mode`` (``full``: pretrain then finetune; ``finetune``: finetune the
latest pretraining run), ``preset``, ``pretrain_steps`` / ``pretrain_epochs``, ``finetune_epochs``, ``max_length``,
``seeds``. The training tasks run on the queue ``ODYSSEY_TRAINING_QUEUE`` (``gpu`` in the production stack: a
Celery worker on the GPU trainer image; ``default`` locally, in-process on CPU). The candidate replaces the
champion only if the promotion rule allows it (``ops.model_promotion`` records why); publishes ``odyssey_models``.
"""

from __future__ import annotations

import datetime as dt
import os

import pendulum
from airflow.sdk import Asset, Param, dag, task

MODELS = Asset("odyssey_models")
QUEUE = os.environ.get("ODYSSEY_TRAINING_QUEUE", "default")
DEFAULTS = {"retries": 1, "retry_delay": dt.timedelta(minutes=5), "retry_exponential_backoff": True}


@dag(
    dag_id="retrain",
    schedule=os.environ.get("ODYSSEY_RETRAIN_SCHEDULE", "@weekly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["odyssey", "training"],
    doc_md=__doc__,
    params={
        "mode": Param("full", enum=["full", "finetune"], description="pretrain then finetune, or finetune only"),
        "preset": Param("small", enum=["tiny", "small", "paper"]),
        "pretrain_steps": Param(0, type="integer", minimum=0, description="0: use pretrain_epochs"),
        "pretrain_epochs": Param(1.0, type="number", minimum=0),
        "finetune_epochs": Param(3, type="integer", minimum=1),
        "max_length": Param(2048, type="integer", minimum=16),
        "seeds": Param(1, type="integer", minimum=1, description="finetuning seeds for mean ± std"),
        "seed": Param(0, type="integer"),
    },
)
def retrain():
    @task(queue=QUEUE, execution_timeout=dt.timedelta(hours=24))
    def pretrain(params: dict | None = None, run_id=None) -> int:
        from odyssey_batch.orchestration import steps

        if params["mode"] == "finetune":
            return steps.call(steps.latest_pretraining_run)
        return steps.call(steps.pretrain_model, params["preset"], params["pretrain_steps"], params["pretrain_epochs"],
                          params["max_length"], params["seed"], f"retrain/{run_id}/pretrain")  # fmt: skip

    @task(queue=QUEUE, execution_timeout=dt.timedelta(hours=24))
    def finetune(pretrained: int, params: dict | None = None, run_id=None) -> int:
        from odyssey_batch.orchestration import steps

        # a retry of the same DAG run reuses what an earlier try trained: one candidate per DAG run
        return steps.call(steps.finetune_model, pretrained, params["finetune_epochs"], params["max_length"],
                          params["seed"], f"retrain/{run_id}/finetune")  # fmt: skip

    @task(outlets=[MODELS], execution_timeout=dt.timedelta(hours=6))
    def evaluate_and_promote(version: int, params: dict | None = None) -> dict:
        from odyssey_batch.orchestration import steps

        return steps.call(steps.evaluate_and_promote, version, params["seeds"])

    evaluate_and_promote(finetune(pretrain()))


retrain_dag = retrain()
