-- odyssey-batch warehouse, version 7: heartbeats of every kind of run, the `abandoned` status, idempotent
-- retries, and what a scoring run held back.
--
-- Every run (ops.ingest_run, ops.dataset_version, ops.training_run, risk.scoring_run, risk.scoring_partition)
-- carries heartbeat_at, refreshed by the working process (odyssey_batch/warehouse/liveness.py) every
-- ODYSSEY_HEARTBEAT_SECONDS. A run still unfinished whose heartbeat is older than ODYSSEY_STALE_RUN_MINUTES has
-- lost its process: the next command or DAG run of its kind marks it 'abandoned', with the reason in `error`.
-- An abandoned or failed scoring run can never be committed.

ALTER TABLE ops.ingest_run ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE ops.dataset_version ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE ops.training_run ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE risk.scoring_run ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE risk.scoring_partition ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();

ALTER TABLE ops.dataset_version DROP CONSTRAINT dataset_version_status_check;
ALTER TABLE ops.dataset_version ADD CONSTRAINT dataset_version_status_check
    CHECK (status IN ('building', 'ready', 'failed', 'abandoned'));
ALTER TABLE ops.training_run DROP CONSTRAINT training_run_status_check;
ALTER TABLE ops.training_run ADD CONSTRAINT training_run_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned'));
ALTER TABLE risk.scoring_run DROP CONSTRAINT scoring_run_status_check;
ALTER TABLE risk.scoring_run ADD CONSTRAINT scoring_run_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned'));
ALTER TABLE risk.scoring_partition DROP CONSTRAINT scoring_partition_status_check;
ALTER TABLE risk.scoring_partition ADD CONSTRAINT scoring_partition_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned'));

-- The sweep looks for unfinished runs only.
CREATE INDEX ingest_run_running_idx ON ops.ingest_run (heartbeat_at) WHERE status = 'running';
CREATE INDEX training_run_running_idx ON ops.training_run (heartbeat_at) WHERE status = 'running';

-- Idempotent retries: the orchestrator's key for the work (e.g. `retrain/<dag run id>/finetune`). A retried task
-- with the same key reuses a succeeded training run, or the running scoring run, instead of starting another.
ALTER TABLE ops.training_run ADD COLUMN run_key text;
CREATE INDEX training_run_key_idx ON ops.training_run (run_key) WHERE run_key IS NOT NULL;
ALTER TABLE risk.scoring_run ADD COLUMN run_key text;
CREATE UNIQUE INDEX scoring_run_one_running_key_idx ON risk.scoring_run (run_key)
    WHERE run_key IS NOT NULL AND status = 'running';

-- The quality gate downstream: patients with rows from an ingest run that is not usable (rejected and not
-- accepted, or not validated yet) are not scored; the run records which runs and how many of its patients.
ALTER TABLE risk.scoring_partition ADD COLUMN held_back_runs bigint[] NOT NULL DEFAULT '{}';
ALTER TABLE risk.scoring_partition ADD COLUMN held_back_patients integer NOT NULL DEFAULT 0;
ALTER TABLE risk.scoring_run ADD COLUMN held_back_runs bigint[] NOT NULL DEFAULT '{}';
ALTER TABLE risk.scoring_run ADD COLUMN held_back_patients integer NOT NULL DEFAULT 0;

-- Analysts see what a published run held back (counts and ingest run ids only). Columns are appended, so the
-- view keeps its grants.
CREATE OR REPLACE VIEW risk.scoring_runs WITH (security_barrier) AS
SELECT run_id, as_of, model_version, dataset_version, cohort, started_at, finished_at, n_patients, n_scores,
       patients_per_s, unknown_rate, drift_flagged, drift, held_back_runs, held_back_patients
FROM risk.scoring_run
WHERE status = 'succeeded';
