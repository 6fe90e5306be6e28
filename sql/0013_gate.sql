-- odyssey-batch warehouse, version 13: a gate at the right granularity.
--
-- Row-level implausibility (an event before birth, an encounter ending before it starts, a lab value no body can
-- have) no longer rejects a whole run: the gate excludes the affected records, or the affected patients where the
-- record is structural (a Patient whose death precedes its birth), and records each one here with its reason. It
-- rejects the run only when a check's failing share passes that check's threshold (settings
-- dq_max_row_failure_rate, dq_row_failure_rates). Feed-level failures (volume drop, a lab code switching unit across
-- the feed, missing files, schema breaks, times in the future) reject the run as before.
--
-- Every stage downstream reads ops.dq_exclusion_current and skips what it lists (tokenize, and through its
-- datasets training; scoring), saying how many. Safe to re-apply.

CREATE TABLE IF NOT EXISTS ops.dq_exclusion (
    exclusion_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    check_id       bigint      NOT NULL REFERENCES ops.dq_check (check_id) ON DELETE CASCADE,
    run_id         bigint      NOT NULL REFERENCES ops.ingest_run (run_id),  -- the ingest run the gate checked
    source_run_id  bigint      NOT NULL,   -- the ingest run that loaded the excluded row (differs in warehouse scope)
    suite          text        NOT NULL,   -- e.g. cross_table.observation
    check_name     text        NOT NULL,   -- e.g. not_before_birth
    resource_type  text        NOT NULL,   -- the FHIR type of the excluded row: Patient, Encounter, Observation, ...
    resource_id    text        NOT NULL,   -- its id (the ehr table's key)
    patient_id     text,                   -- whose record it is
    level          text        NOT NULL CHECK (level IN ('record', 'patient')),  -- patient: the whole patient goes
    reason         text        NOT NULL,   -- the check's description
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dq_exclusion_check_idx ON ops.dq_exclusion (check_id);
CREATE INDEX IF NOT EXISTS dq_exclusion_resource_idx ON ops.dq_exclusion (resource_type, resource_id);

-- The exclusions in force: those of the latest check of each ingest run, for rows whose current version is still
-- the one that run loaded (a later export that corrects a record lifts its exclusion).
CREATE OR REPLACE VIEW ops.dq_exclusion_current AS
SELECT x.exclusion_id, x.check_id, x.run_id, x.source_run_id, x.suite, x.check_name, x.resource_type,
       x.resource_id, x.patient_id, x.level, x.reason, x.created_at
FROM ops.dq_exclusion x
JOIN fhir.resource r ON r.resource_type = x.resource_type AND r.resource_id = x.resource_id
                    AND r.run_id = x.source_run_id
WHERE x.check_id = (SELECT max(c.check_id) FROM ops.dq_check c WHERE c.run_id = x.run_id);

-- Per check: the rows it excluded, the failing share of its batch, and the share that would reject the run.
ALTER TABLE ops.dq_result ADD COLUMN IF NOT EXISTS excluded_rows bigint NOT NULL DEFAULT 0;
ALTER TABLE ops.dq_result ADD COLUMN IF NOT EXISTS failure_rate double precision;
ALTER TABLE ops.dq_result ADD COLUMN IF NOT EXISTS max_failure_rate double precision;  -- NULL: feed-level check
-- Per gate run: what it excluded in all.
ALTER TABLE ops.dq_check ADD COLUMN IF NOT EXISTS excluded_records bigint NOT NULL DEFAULT 0;
ALTER TABLE ops.dq_check ADD COLUMN IF NOT EXISTS excluded_patients integer NOT NULL DEFAULT 0;

-- Downstream: how many excluded records and patients each run skipped.
ALTER TABLE ops.dataset_version ADD COLUMN IF NOT EXISTS excluded_patients integer NOT NULL DEFAULT 0;
ALTER TABLE ops.dataset_version ADD COLUMN IF NOT EXISTS excluded_records bigint NOT NULL DEFAULT 0;
ALTER TABLE risk.scoring_partition ADD COLUMN IF NOT EXISTS excluded_patients integer NOT NULL DEFAULT 0;
ALTER TABLE risk.scoring_run ADD COLUMN IF NOT EXISTS excluded_patients integer NOT NULL DEFAULT 0;

-- Analysts see how many patients a published run left out for data quality (a count, never ids). The column is
-- appended, so the view keeps its grants (0006, 0007).
CREATE OR REPLACE VIEW risk.scoring_runs WITH (security_barrier) AS
SELECT run_id, as_of, model_version, dataset_version, cohort, started_at, finished_at, n_patients, n_scores,
       patients_per_s, unknown_rate, drift_flagged, drift, held_back_runs, held_back_patients, excluded_patients
FROM risk.scoring_run
WHERE status = 'succeeded';
GRANT SELECT ON risk.scoring_runs TO odyssey_analyst;

-- The pipeline reads and writes the new table and view (0011: repeated for a migration user other than the one
-- whose default privileges cover them). Analysts get nothing in ops.
GRANT SELECT, INSERT, UPDATE, DELETE ON ops.dq_exclusion, ops.dq_exclusion_current TO odyssey_pipeline;
GRANT USAGE, SELECT, UPDATE ON SEQUENCE ops.dq_exclusion_exclusion_id_seq TO odyssey_pipeline;
