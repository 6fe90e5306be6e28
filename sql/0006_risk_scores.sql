-- odyssey-batch warehouse, version 6: nightly risk scores (schema risk), the views analysts read, and the roles.
--
-- Visibility: a scoring run writes its partitions (risk.scoring_partition, risk.score, risk.explanation,
-- risk.score_distribution) while its status is 'running', then in ONE transaction deletes the previous
-- 'succeeded' run of the same as_of (its rows go with it, ON DELETE CASCADE) and marks itself 'succeeded'.
-- Every view reads succeeded runs only, so analysts see a whole run or nothing, never a half-written or failed
-- one; a unique index allows at most one succeeded run per as_of.
--
-- Analysts read the views, never the tables:
--   risk.latest_score        one row per (patient_id, task): the score from the latest succeeded run that scored it
--   risk.patient_risk        one row per patient: one column per default task, highest_band, scores (all tasks)
--   risk.high_risk_today     latest_score rows with band 'high' from the most recent succeeded as_of
--   risk.latest_explanation  the top attributions behind each latest_score row
--   risk.scoring_runs        succeeded runs: when, which model and dataset, throughput, drift
--
-- Roles (cluster-wide, NOLOGIN group roles; created here when missing, so the migration user needs CREATEROLE):
--   odyssey_pipeline  the pipeline's service users: read/write on every table of fhir, ehr, ops, staging, risk
--                     (also tables created later by the migration user, through default privileges).
--   odyssey_analyst   USAGE on schema risk and SELECT on the five views only: no table of risk, nothing in
--                     fhir, ehr, ops or staging. The views are owned by the migration user and are not
--                     security_invoker, so they read the tables with the owner's rights; security_barrier keeps an
--                     analyst's own (leaky) functions from seeing rows of runs that are not succeeded.
-- A hospital grants access with logins in these roles, e.g.
--   CREATE ROLE alice LOGIN PASSWORD '...' IN ROLE odyssey_analyst;
--   CREATE ROLE odyssey_nightly LOGIN PASSWORD '...' IN ROLE odyssey_pipeline;
-- Nothing in fhir, ehr, ops, staging or risk is granted to PUBLIC. A view added later must be granted to
-- odyssey_analyst explicitly.

CREATE SCHEMA IF NOT EXISTS risk;

-- One row per `odyssey-batch score`: the patients of a cohort scored as of a point in time.
CREATE TABLE risk.scoring_run (
    run_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    as_of            timestamptz NOT NULL,
    model_version    integer     NOT NULL REFERENCES ops.model_version (model_version),
    dataset_version  bigint      NOT NULL REFERENCES ops.dataset_version (dataset_version_id),
    cohort           text        NOT NULL,
    active_days      double precision,        -- the look-back of the `active` cohort (NULL for `triggers`)
    partitions       integer     NOT NULL DEFAULT 1 CHECK (partitions >= 1),
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    status           text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    n_patients       integer,
    n_scores         integer,
    patients_per_s   double precision,
    unknown_rate     double precision,     -- share of the scored tokens that were out of the model's vocabulary
    drift_flagged    boolean     NOT NULL DEFAULT false,
    drift            jsonb       NOT NULL DEFAULT '{}',
    error            text
);
-- At most one published run per as_of, whatever the code does.
CREATE UNIQUE INDEX scoring_run_one_succeeded_idx ON risk.scoring_run (as_of) WHERE status = 'succeeded';
CREATE INDEX scoring_run_status_idx ON risk.scoring_run (status, as_of);

-- One row per partition of a run (partitions are scored independently and may be retried).
CREATE TABLE risk.scoring_partition (
    run_id          bigint      NOT NULL REFERENCES risk.scoring_run (run_id) ON DELETE CASCADE,
    partition       integer     NOT NULL,
    status          text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    n_patients      integer,
    n_scores        integer,
    event_tokens    bigint      NOT NULL DEFAULT 0,   -- event tokens scored, for the run's unknown_rate
    unknown_tokens  bigint      NOT NULL DEFAULT 0,   -- of which out of the model's vocabulary
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    error           text,
    PRIMARY KEY (run_id, partition)
);

-- One row per (patient, task) scored by a run.
CREATE TABLE risk.score (
    run_id           bigint           NOT NULL REFERENCES risk.scoring_run (run_id) ON DELETE CASCADE,
    partition        integer          NOT NULL,
    as_of            timestamptz      NOT NULL,   -- the run's as_of
    patient_id       text             NOT NULL,
    task             text             NOT NULL,
    prediction_time  timestamptz      NOT NULL,
    probability      double precision NOT NULL CHECK (probability >= 0 AND probability <= 1),
    risk_band        text             NOT NULL CHECK (risk_band IN ('low', 'medium', 'high')),
    model_version    integer          NOT NULL,
    PRIMARY KEY (run_id, patient_id, task)
);
-- latest_score walks this index in order instead of sorting every score row (a score's as_of is its run's)
CREATE INDEX score_latest_idx ON risk.score (patient_id, task, as_of DESC, run_id DESC);
CREATE INDEX score_partition_idx ON risk.score (run_id, partition);

-- The top attributions of a score, rank 1 = largest.
CREATE TABLE risk.explanation (
    run_id       bigint           NOT NULL REFERENCES risk.scoring_run (run_id) ON DELETE CASCADE,
    partition    integer          NOT NULL,
    patient_id   text             NOT NULL,
    task         text             NOT NULL,
    rank         integer          NOT NULL CHECK (rank >= 1),
    token        text             NOT NULL,
    display      text,
    event_time   timestamptz,
    attribution  double precision NOT NULL,
    PRIMARY KEY (run_id, patient_id, task, rank)
);
CREATE INDEX explanation_partition_idx ON risk.explanation (run_id, partition);

-- The distribution of a run's scores per task, and its drift (PSI) against the reference.
-- histogram: the share of the scores in each of 10 equal-width probability bins [0, 0.1), ..., [0.9, 1].
CREATE TABLE risk.score_distribution (
    run_id       bigint             NOT NULL REFERENCES risk.scoring_run (run_id) ON DELETE CASCADE,
    task         text               NOT NULL,
    n            integer            NOT NULL,
    mean         double precision,
    histogram    double precision[] NOT NULL,
    band_shares  jsonb              NOT NULL,   -- {"low": share, "medium": share, "high": share}
    psi          double precision,
    flagged      boolean            NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, task)
);

-- The views: succeeded runs only.

CREATE VIEW risk.latest_score WITH (security_barrier) AS
SELECT DISTINCT ON (s.patient_id, s.task)
       s.patient_id, s.task, s.probability, s.risk_band, r.as_of, s.prediction_time, s.model_version, s.run_id
FROM risk.score s
JOIN risk.scoring_run r ON r.run_id = s.run_id
WHERE r.status = 'succeeded'
ORDER BY s.patient_id, s.task, s.as_of DESC, s.run_id DESC;  -- the order of score_latest_idx

CREATE VIEW risk.patient_risk WITH (security_barrier) AS
SELECT patient_id,
       max(as_of) AS as_of,
       max(probability) FILTER (WHERE task = 'mortality_30d')        AS mortality_30d,
       max(probability) FILTER (WHERE task = 'los_7d')               AS los_7d,
       max(probability) FILTER (WHERE task = 'readmission_30d')      AS readmission_30d,
       max(probability) FILTER (WHERE task = 'hypertension_1y')      AS hypertension_1y,
       max(probability) FILTER (WHERE task = 'fluid_electrolyte_1y') AS fluid_electrolyte_1y,
       max(probability) FILTER (WHERE task = 'lipid_disorder_1y')    AS lipid_disorder_1y,
       (ARRAY['low', 'medium', 'high'])[
           max(CASE risk_band WHEN 'high' THEN 3 WHEN 'medium' THEN 2 ELSE 1 END)] AS highest_band,
       jsonb_object_agg(task, probability) AS scores
FROM risk.latest_score
GROUP BY patient_id;

CREATE VIEW risk.high_risk_today WITH (security_barrier) AS
SELECT l.patient_id, l.task, l.probability, l.risk_band, l.as_of, l.prediction_time, l.model_version, l.run_id
FROM risk.latest_score l
WHERE l.risk_band = 'high'
  AND l.as_of = (SELECT max(r.as_of) FROM risk.scoring_run r WHERE r.status = 'succeeded')
ORDER BY l.task, l.probability DESC, l.patient_id;

CREATE VIEW risk.latest_explanation WITH (security_barrier) AS
SELECT e.patient_id, e.task, e.rank, e.token, e.display, e.event_time, e.attribution, e.run_id
FROM risk.latest_score l
JOIN risk.explanation e ON e.run_id = l.run_id AND e.patient_id = l.patient_id AND e.task = l.task;

CREATE VIEW risk.scoring_runs WITH (security_barrier) AS
SELECT run_id, as_of, model_version, dataset_version, cohort, started_at, finished_at, n_patients, n_scores,
       patients_per_s, unknown_rate, drift_flagged, drift
FROM risk.scoring_run
WHERE status = 'succeeded';

-- The roles. Roles are cluster-wide and this migration runs in every database of the server: create them only
-- when missing, and tolerate another database's migration creating them at the same moment (that one raises
-- duplicate_object, or unique_violation on the catalog index when both insert concurrently).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'odyssey_pipeline') THEN
        CREATE ROLE odyssey_pipeline NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'odyssey_analyst') THEN
        CREATE ROLE odyssey_analyst NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- The pipeline: everything it reads and writes, now and in later migrations. (ANALYZE still needs the owner:
-- run as a non-owner it only warns and skips.)
GRANT USAGE ON SCHEMA fhir, ehr, ops, staging, risk TO odyssey_pipeline;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA fhir, ehr, ops, staging, risk TO odyssey_pipeline;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA fhir, ehr, ops, staging, risk TO odyssey_pipeline;
ALTER DEFAULT PRIVILEGES IN SCHEMA fhir, ehr, ops, staging, risk
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO odyssey_pipeline;
ALTER DEFAULT PRIVILEGES IN SCHEMA fhir, ehr, ops, staging, risk
    GRANT USAGE, SELECT ON SEQUENCES TO odyssey_pipeline;

-- Analysts: the five views, nothing else.
GRANT USAGE ON SCHEMA risk TO odyssey_analyst;
GRANT SELECT ON risk.latest_score, risk.patient_risk, risk.high_risk_today, risk.latest_explanation,
    risk.scoring_runs TO odyssey_analyst;
