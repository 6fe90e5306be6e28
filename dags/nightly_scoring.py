"""nightly_scoring: score every eligible patient for every task with the champion, into ``risk.*``.

Daily at 02:00 in the hospital's time zone (``AIRFLOW_VAR_ODYSSEY_TIMEZONE``, else ``ODYSSEY_DEFAULT_TIMEZONE``), as
of the run's logical date (or the ``as_of`` param). The patients are split into ``ODYSSEY_SCORING_PARTITIONS``
hash partitions scored by parallel mapped tasks; the run becomes visible to analysts only when every partition
succeeded (one commit transaction; re-running a date replaces it); if a partition fails for good, the run is
marked failed and the previous scores stay. Fails at once and clearly when no champion model exists. Drift
flags are logged and stored in ``risk.scoring_run``.
"""

from __future__ import annotations

import datetime as dt
import os

import pendulum
from airflow.sdk import Asset, Param, dag, task

SCORES = Asset("odyssey_scores")
TIMEZONE = os.environ.get("AIRFLOW_VAR_ODYSSEY_TIMEZONE") or os.environ.get("ODYSSEY_DEFAULT_TIMEZONE") or "UTC"
PARTITIONS = int(os.environ.get("ODYSSEY_SCORING_PARTITIONS", "4"))
DEFAULTS = {"retries": 2, "retry_delay": dt.timedelta(minutes=2), "retry_exponential_backoff": True}


@dag(
    dag_id="nightly_scoring",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz=TIMEZONE),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["odyssey", "scoring"],
    doc_md=__doc__,
    params={
        "as_of": Param("", type="string", description="ISO time to score as of (default: the logical date)"),
        "partitions": Param(PARTITIONS, type="integer", minimum=1),
        "cohort": Param("triggers", enum=["triggers", "active"]),
    },
)
def nightly_scoring():
    @task(execution_timeout=dt.timedelta(minutes=10))
    def start(params: dict | None = None, logical_date=None, run_after=None, run_id=None) -> dict:
        from odyssey_batch.orchestration import steps

        when = params["as_of"] or (logical_date or run_after).isoformat()  # a retry reuses its DAG run's run
        run_id = steps.call(steps.start_scoring, when, params["partitions"], params["cohort"], f"nightly/{run_id}")
        return {"run_id": run_id, "partitions": list(range(params["partitions"]))}

    @task
    def partitions_of(started: dict) -> list[dict]:
        return [{"run_id": started["run_id"], "partition": k} for k in started["partitions"]]

    @task(execution_timeout=dt.timedelta(hours=4), max_active_tis_per_dagrun=16)
    def score(run_id: int, partition: int) -> dict:
        from odyssey_batch.orchestration import steps

        return steps.call(steps.score_partition, run_id, partition)

    @task(outlets=[SCORES], execution_timeout=dt.timedelta(minutes=30))
    def commit(started: dict, scored: list[dict]) -> dict:
        from odyssey_batch.orchestration import steps

        result = steps.call(steps.commit_scoring, started["run_id"])
        if result["drift_flagged"]:
            import logging

            logging.getLogger("odyssey_batch").warning("drift: %s", "; ".join(result["drift_reasons"]))
        return result

    @task(trigger_rule="one_failed", retries=0)
    def mark_failed(ti=None) -> None:
        """Something failed for good: the run (if one started) is marked failed, the previous scores stay, and
        this leaf fails too, so the DAG run is failed."""
        from airflow.sdk.exceptions import AirflowFailException

        from odyssey_batch.orchestration import steps

        started = ti.xcom_pull(task_ids="start")
        if started:  # a no-op on a run that was committed before its task failed: published scores stay
            failed = steps.fail_scoring(started["run_id"], "a partition or the commit failed in Airflow")
            state = "failed; the previous scores stay" if failed else "was not running (committed, or failed before)"
            raise AirflowFailException(f"scoring run {started['run_id']} {state}")
        raise AirflowFailException("no scoring run was started (see the start task)")

    started = start()
    scored = score.expand_kwargs(partitions_of(started))
    committed = commit(started, scored)
    [scored, committed] >> mark_failed()


nightly_scoring_dag = nightly_scoring()
