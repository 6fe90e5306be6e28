"""Heartbeats and the sweep of dead runs, on a real warehouse: a working process keeps its run fresh and never
revives a finished one; a process really killed mid-run is swept to `abandoned`, with the reason, by the next
run of its kind (ingest, dataset, training), while a live one beside it is left alone; a swept training run can
be resumed to the end. (Scoring runs: tests/test_score.py.)"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from odyssey_batch.cli.main import example_export
from odyssey_batch.ingest import ingest
from odyssey_batch.quality.gate import validate
from odyssey_batch.sequences.dataset import TokenizeOptions, tokenize
from odyssey_batch.settings import Settings
from odyssey_batch.training.pretrain import PretrainOptions, pretrain
from odyssey_batch.warehouse.liveness import heartbeat
from tests.conftest import REPO, run_sql

SWEPT = re.compile(
    r"abandoned: no heartbeat since (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) \(more than [0-9.]+ minutes\): the process "
    r"working on it died or was killed"
)
# A process that keeps an ingest run's heartbeat fresh until it is killed.
BEATING = """
import sys, time
from odyssey_batch.settings import Settings
from odyssey_batch.warehouse.liveness import heartbeat
with heartbeat(sys.argv[1], Settings(heartbeat_seconds=0.05), ("ingest", int(sys.argv[2]))):
    time.sleep(120)
"""


def _ingest_run(url: str, source: str, *, age_s: float = 3600.0, status: str = "running") -> int:
    return run_sql(url, """INSERT INTO ops.ingest_run (source, status, heartbeat_at)
                           VALUES (%s, %s, now() - make_interval(secs => %s)) RETURNING run_id""",
                   (source, status, age_s))[0][0]  # fmt: skip


def _age(url: str, table: str, key: str, value: int) -> float:
    """Seconds since the row's heartbeat."""
    return run_sql(url, f"SELECT extract(epoch FROM now() - heartbeat_at)::float8 FROM {table} WHERE {key} = %s",
                   (value,))[0][0]  # fmt: skip


def _wait(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_heartbeat_keeps_a_working_run_fresh_and_never_revives_a_finished_one(db_url):
    settings = Settings(heartbeat_seconds=0.05)
    working = _ingest_run(db_url, "export-a")
    finished = _ingest_run(db_url, "export-b", status="succeeded")
    with heartbeat(db_url, settings, ("ingest", working), ("ingest", finished)) as pulse:
        _wait(lambda: _age(db_url, "ops.ingest_run", "run_id", working) < 5)
        _wait(lambda: pulse.beats >= 3)
    assert _age(db_url, "ops.ingest_run", "run_id", finished) > 3000  # a finished run's heartbeat stays as it was
    assert run_sql(db_url, "SELECT status FROM ops.ingest_run ORDER BY run_id") == [("running",), ("succeeded",)]
    stopped = pulse.beats
    time.sleep(0.3)
    assert pulse.beats == stopped  # the thread is gone once the block ends


def test_a_killed_process_is_swept_by_the_next_ingest_and_a_live_one_is_not(db_url, tmp_path):
    dead, alive = _ingest_run(db_url, "export-killed"), _ingest_run(db_url, "export-alive")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {run: subprocess.Popen([sys.executable, "-c", BEATING, db_url, str(run)], env=env, start_new_session=True)
             for run in (dead, alive)}  # fmt: skip
    try:
        _wait(lambda: max(_age(db_url, "ops.ingest_run", "run_id", r) for r in (dead, alive)) < 1)
        os.killpg(procs[dead].pid, signal.SIGKILL)
        procs[dead].wait(timeout=30)
        last = run_sql(db_url, "SELECT heartbeat_at FROM ops.ingest_run WHERE run_id = %s", (dead,))[0][0]
        time.sleep(2.5)  # more than the timeout below: only the killed process stopped beating
        settings = Settings(home=tmp_path / "home", ingest_workers=1, stale_run_minutes=2 / 60)
        new = ingest(str(example_export()), settings, url=db_url).run_id
        rows = dict((r, (s, e)) for r, s, e in run_sql(db_url, "SELECT run_id, status, error FROM ops.ingest_run"))
        assert rows[new] == ("succeeded", None) and rows[alive] == ("running", None)
        status, error = rows[dead]
        assert status == "abandoned" and SWEPT.fullmatch(error), error
        # the reason says when the process was last seen
        assert SWEPT.fullmatch(error).group(1) == last.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_datasets_and_training_runs_whose_process_died_are_swept_by_the_next_of_their_kind(db_url, tmp_path):
    settings = Settings(home=tmp_path / "home", ingest_workers=1)
    run = ingest(str(example_export()), settings, url=db_url).run_id
    assert validate(db_url, settings, run, data_docs=False).success
    stale = run_sql(db_url, """INSERT INTO ops.dataset_version (source_runs, heartbeat_at)
                               VALUES (ARRAY[%s]::bigint[], now() - interval '2 hours')
                               RETURNING dataset_version_id""", (run,))[0][0]  # fmt: skip
    built = tokenize(db_url, settings, TokenizeOptions(min_count=1)).dataset_version_id
    rows = run_sql(db_url, "SELECT dataset_version_id, status, error FROM ops.dataset_version ORDER BY 1")
    assert [r[:2] for r in rows] == [(stale, "abandoned"), (built, "ready")]
    assert SWEPT.fullmatch(rows[0][2]) and rows[1][2] is None

    # a pretraining process that died after its first checkpoint (stop_after: as a kill would leave it)
    options = PretrainOptions(preset="tiny", max_length=64, steps=2, checkpoint_every=1, batch_size=4)
    cut = pretrain(db_url, settings, built, options, stop_after=1)
    assert not cut.finished
    run_sql(db_url, "UPDATE ops.training_run SET heartbeat_at = now() - interval '2 hours'")
    other = pretrain(db_url, settings, built, PretrainOptions(preset="tiny", max_length=64, steps=1, batch_size=4))
    rows = run_sql(db_url, "SELECT training_run_id, status, error FROM ops.training_run ORDER BY 1")
    assert [r[:2] for r in rows] == [(cut.training_run_id, "abandoned"), (other.training_run_id, "succeeded")]
    assert SWEPT.fullmatch(rows[0][2])
    # its checkpoints stay: resuming it finishes it where an uninterrupted run would end
    resumed = pretrain(db_url, settings, None, options, resume=cut.training_run_id)
    assert resumed.steps == 2 and resumed.finished
    assert run_sql(db_url, "SELECT status, error, steps FROM ops.training_run WHERE training_run_id = %s",
                   (cut.training_run_id,)) == [("succeeded", None, 2)]  # fmt: skip


def test_a_training_run_swept_meanwhile_is_never_marked_succeeded(db_url):
    """The final status write checks the status in SQL: a swept run stays abandoned (resume it to finish it)."""
    from odyssey_batch.training.runs import finish_run

    run_sql(db_url, "INSERT INTO ops.dataset_version (source_runs) VALUES ('{}')")
    run = run_sql(db_url, """INSERT INTO ops.training_run (kind, status, dataset_version_id, preset, backend, device,
                                                           seed, options)
                             VALUES ('pretrain', 'abandoned', 1, 'tiny', 'reference', 'cpu', 0, '{}')
                             RETURNING training_run_id""")[0][0]  # fmt: skip
    with pytest.raises(RuntimeError, match="no longer running"):
        finish_run(db_url, run, 1, 1, 1.0, 1.0, 1.0, "x")
    assert run_sql(db_url, "SELECT status FROM ops.training_run") == [("abandoned",)]


def test_a_broken_manifest_fails_the_airflow_task_at_once(db_url, tmp_path, monkeypatch):
    """Retrying the same bytes cannot help: the ingest step raises PermanentError (no retries), nothing written."""
    import json

    from odyssey_batch.orchestration import steps

    export = tmp_path / "landing" / "2026-01-02"
    export.mkdir(parents=True)
    for path in example_export().iterdir():
        (export / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["output"][0]["count"] = "four"
    (export / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("AIRFLOW_CONN_ODYSSEY_WAREHOUSE", db_url)
    monkeypatch.setenv("ODYSSEY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ODYSSEY_INGEST_WORKERS", "1")

    with pytest.raises(steps.PermanentError, match=r"2026-01-02: manifest.json: output\[0\]\.count"):
        steps.ingest_export(str(export))
    assert run_sql(db_url, "SELECT count(*) FROM ops.ingest_run") == [(0,)]
