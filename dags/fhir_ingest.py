"""fhir_ingest: load new FHIR exports from the landing location into the warehouse.

The landing location (Airflow variable ``odyssey_landing`` — e.g. ``AIRFLOW_VAR_ODYSSEY_LANDING=s3://fhir-landing/``
— or ``ODYSSEY_LANDING``) holds one folder (prefix) per export. Each run lists the exports not loaded yet, loads
each in its own mapped task (ingest is idempotent: a retried or repeated export finds its rows unchanged), and
publishes the ``odyssey_ingested`` asset, which schedules ``data_quality``. Thin over ``odyssey_batch``.
"""

from __future__ import annotations

import datetime as dt
import os

import pendulum
from airflow.sdk import Asset, dag, task

INGESTED = Asset("odyssey_ingested")
DEFAULTS = {"retries": 3, "retry_delay": dt.timedelta(minutes=1), "retry_exponential_backoff": True,
            "max_retry_delay": dt.timedelta(minutes=15)}  # fmt: skip


@dag(
    dag_id="fhir_ingest",
    schedule=os.environ.get("ODYSSEY_INGEST_SCHEDULE", "@hourly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["odyssey", "ingest"],
    doc_md=__doc__,
)
def fhir_ingest():
    @task(execution_timeout=dt.timedelta(minutes=10))
    def find_exports() -> list[str]:
        from airflow.sdk import Variable

        from odyssey_batch.orchestration import steps

        landing = Variable.get("odyssey_landing", default=os.environ.get("ODYSSEY_LANDING", ""))
        if not landing:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException("set the landing location: AIRFLOW_VAR_ODYSSEY_LANDING or ODYSSEY_LANDING")
        return steps.call(steps.new_exports, landing)

    @task(execution_timeout=dt.timedelta(hours=6))
    def load(source: str) -> dict:
        from odyssey_batch.orchestration import steps

        return steps.call(steps.ingest_export, source)

    @task(outlets=[INGESTED])
    def publish(loaded: list[dict]) -> dict:
        return {"runs": [r["run_id"] for r in loaded], "records": sum(r["records"] or 0 for r in loaded)}

    publish(load.expand(source=find_exports()))


fhir_ingest_dag = fhir_ingest()
