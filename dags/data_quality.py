"""data_quality: the Great Expectations gate on every newly loaded ingest run.

Scheduled on the ``odyssey_ingested`` asset. A rejected run fails the DAG with the gate's message (which table,
which expectation, how many rows; no retries: only new data or ``odyssey-batch accept-run`` changes the verdict)
and publishes nothing; a passed gate publishes ``odyssey_validated``, which schedules ``build_sequences``.
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import Asset, dag, task

INGESTED = Asset("odyssey_ingested")
VALIDATED = Asset("odyssey_validated")
DEFAULTS = {"retries": 2, "retry_delay": dt.timedelta(minutes=1), "retry_exponential_backoff": True}


@dag(
    dag_id="data_quality",
    schedule=[INGESTED],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["odyssey", "quality"],
    doc_md=__doc__,
)
def data_quality():
    @task(outlets=[VALIDATED], execution_timeout=dt.timedelta(hours=2))
    def gate() -> dict:
        from odyssey_batch.orchestration import steps

        return steps.call(steps.quality_gate)

    gate()


data_quality_dag = data_quality()
