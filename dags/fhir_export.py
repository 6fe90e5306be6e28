"""fhir_export: pull the nightly Bulk Data export from the hospital's FHIR server, then load it.

pull → load: ``pull`` kicks off ``$export`` on the server of the Airflow connection ``fhir_export`` (host: the FHIR
base URL; login: the SMART client id; password: its private key, PEM or JWK set, or a bearer token; extra:
``{"group": ..., "types": "Patient,Encounter,...", "type_filters": [...], "kid": ..., "scope": ...}``), incremental
from the last complete pull (``--since auto``), and lands it as a Bulk Data folder in the landing location
(``odyssey_landing``), committed last. ``load`` ingests that folder and publishes ``odyssey_ingested`` (so
``data_quality`` → ``build_sequences`` follow, as for ``fhir_ingest``).

One export at a time per server: ``max_active_runs=1``, the pool ``fhir_export`` (create it with 1 slot:
``airflow pools set fhir_export 1 "one Bulk Data export at a time"``; without it the scheduler never runs ``pull``
and the DAG shows a "non-existent pools" warning), and the library's advisory lock per server URL. A retried
``pull`` resumes the same export (its status URL is in ``ops.bulk_pull``): exports that take days survive worker
restarts. Thin over ``odyssey_batch``.
"""

from __future__ import annotations

import datetime as dt
import os

import pendulum
from airflow.sdk import Asset, dag, task

INGESTED = Asset("odyssey_ingested")
DEFAULTS = {"retries": 6, "retry_delay": dt.timedelta(minutes=2), "retry_exponential_backoff": True,
            "max_retry_delay": dt.timedelta(hours=1)}  # fmt: skip


@dag(
    dag_id="fhir_export",
    schedule=os.environ.get("ODYSSEY_EXPORT_SCHEDULE", "0 1 * * *"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["odyssey", "ingest", "export"],
    doc_md=__doc__,
)
def fhir_export():
    @task(pool=os.environ.get("ODYSSEY_EXPORT_POOL", "fhir_export"), execution_timeout=dt.timedelta(hours=23))
    def pull() -> dict:
        from airflow.sdk import BaseHook, Variable

        from odyssey_batch.orchestration import steps

        landing = Variable.get("odyssey_landing", default=os.environ.get("ODYSSEY_LANDING", ""))
        if not landing:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException("set the landing location: AIRFLOW_VAR_ODYSSEY_LANDING or ODYSSEY_LANDING")
        conn = BaseHook.get_connection(os.environ.get("ODYSSEY_EXPORT_CONNECTION", "fhir_export"))
        if "://" not in (conn.host or ""):
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException("the fhir_export connection's host must be the FHIR base URL (https://...)")
        fields = {"host": conn.host, "login": conn.login, "password": conn.password, "extra": conn.extra_dejson}
        return steps.call(steps.pull_export, fields, landing)

    @task(outlets=[INGESTED], execution_timeout=dt.timedelta(hours=6))
    def load(pulled: dict) -> dict:
        from odyssey_batch.orchestration import steps

        return steps.call(steps.ingest_export, pulled["destination"])

    load(pull())


fhir_export_dag = fhir_export()
