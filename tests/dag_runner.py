"""Run one of dags/ with Airflow's ``dag.test()`` in this process and print the outcome as JSON (last line).

    python tests/dag_runner.py DAG_ID [--conf JSON] [--logical-date ISO]
    python tests/dag_runner.py --describe DAG_ID ...

Used by tests/test_dags.py in a subprocess with its own AIRFLOW_HOME (a migrated SQLite metadata database):
Airflow reads its configuration once per process. Prints the run's state, every task instance's state (mapped
ones as ``task[index]``) and the asset events the run emitted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DAGS = Path(__file__).resolve().parents[1] / "dags"


def load(dag_id: str):
    """The DAG object of ``dags/<dag_id>.py`` and the seconds its file took to import."""
    import runpy
    import time

    from airflow.sdk import DAG

    started = time.perf_counter()
    namespace = runpy.run_path(str(DAGS / f"{dag_id}.py"), run_name=f"dags.{dag_id}")
    seconds = time.perf_counter() - started
    return next(d for d in namespace.values() if isinstance(d, DAG) and d.dag_id == dag_id), seconds


def describe(dag_ids: list[str]) -> None:
    """Each DAG's import time, schedule, params and tasks, and the heavy modules the imports pulled in."""
    import airflow.sdk  # noqa: F401  Airflow's own import is not a DAG file's cost

    out = {}
    for dag_id in dag_ids:
        dag, seconds = load(dag_id)
        schedule = dag.schedule if isinstance(dag.schedule, str) else [a.name for a in dag.schedule]
        tasks = {
            t.task_id: {
                "outlets": [o.name for o in t.outlets],
                "retries": t.retries,
                "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                "upstream": sorted(t.upstream_task_ids),
                "queue": t.queue,
                "pool": t.pool,
            }
            for t in dag.tasks
        }
        out[dag_id] = {"seconds": seconds, "schedule": schedule, "timezone": str(dag.timezone),
                       "params": sorted(dag.params.keys()), "tasks": tasks}  # fmt: skip
    heavy = sorted(m for m in ("torch", "odyssey_batch.model", "great_expectations", "sklearn", "pandas")
                   if m in sys.modules)  # fmt: skip
    print(json.dumps({"dags": out, "heavy": heavy}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dag_id", nargs="+")
    parser.add_argument("--describe", action="store_true")
    parser.add_argument("--conf", default="{}")
    parser.add_argument("--logical-date", default=None)
    args = parser.parse_args()
    if args.describe:
        describe(args.dag_id)
        return

    import pendulum

    dag, _ = load(args.dag_id[0])
    logical = pendulum.parse(args.logical_date) if args.logical_date else None
    run = dag.test(run_conf=json.loads(args.conf), logical_date=logical)

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = session.query(AssetModel.name).join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
        query = query.filter(AssetEvent.source_dag_id == dag.dag_id, AssetEvent.source_run_id == run.run_id)
        events = [name for (name,) in query]
        tasks = {}
        for ti in run.get_task_instances(session=session):
            key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
            tasks[key] = str(ti.state)
    print(json.dumps({"state": str(run.state), "tasks": tasks, "asset_events": sorted(events)}))


if __name__ == "__main__":
    main()
