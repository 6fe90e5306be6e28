"""build_sequences: tokenize the validated warehouse into a new dataset version with task labels.

Scheduled on the ``odyssey_validated`` asset; refuses rejected runs that were not accepted; publishes the
``odyssey_dataset`` asset (sequences and labels in the object store, ``ops.dataset_version``).
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import Asset, dag, task

VALIDATED = Asset("odyssey_validated")
DATASET = Asset("odyssey_dataset")
DEFAULTS = {"retries": 2, "retry_delay": dt.timedelta(minutes=2), "retry_exponential_backoff": True}


@dag(
    dag_id="build_sequences",
    schedule=[VALIDATED],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["odyssey", "sequences"],
    doc_md=__doc__,
)
def build_sequences():
    @task(outlets=[DATASET], execution_timeout=dt.timedelta(hours=6))
    def tokenize() -> dict:
        from odyssey_batch.orchestration import steps

        return steps.call(steps.build_dataset)

    tokenize()


build_sequences_dag = build_sequences()
