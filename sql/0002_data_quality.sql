-- odyssey-batch warehouse, version 2: the data-quality gate (Great Expectations results, acceptances).

-- A validated run is usable downstream; a rejected one is not, unless someone accepts it (ops.run_acceptance).
ALTER TABLE ops.ingest_run DROP CONSTRAINT ingest_run_status_check;
ALTER TABLE ops.ingest_run ADD CONSTRAINT ingest_run_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned', 'validated', 'rejected'));

-- One row per `odyssey-batch validate`: what was checked, and the verdict.
CREATE TABLE ops.dq_check (
    check_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            bigint      NOT NULL REFERENCES ops.ingest_run (run_id),
    scope             text        NOT NULL CHECK (scope IN ('run', 'warehouse')),
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL DEFAULT now(),
    success           boolean     NOT NULL,           -- no critical expectation failed
    critical_failures integer     NOT NULL,
    warnings          integer     NOT NULL,
    rows_checked      bigint      NOT NULL,
    data_docs         text                            -- where the Data Docs site of this check was written
);

-- One row per expectation evaluated. Samples carry ids only, never names, values or other identifiers.
CREATE TABLE ops.dq_result (
    dq_result_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    check_id          bigint      NOT NULL REFERENCES ops.dq_check (check_id) ON DELETE CASCADE,
    run_id            bigint      NOT NULL REFERENCES ops.ingest_run (run_id),
    suite             text        NOT NULL,           -- e.g. ehr.encounter, cross_table, ingest
    expectation       text        NOT NULL,           -- the check's name, e.g. end_time_not_before_start
    severity          text        NOT NULL CHECK (severity IN ('critical', 'warning')),
    success           boolean     NOT NULL,
    observed_value    jsonb,
    unexpected_count  bigint,
    unexpected_sample jsonb,
    checked_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dq_result_run_idx ON ops.dq_result (run_id, success, severity);

-- Row counts of the normalized tables at each check, for the volume expectations of the next one.
CREATE TABLE ops.dq_table_count (
    check_id    bigint NOT NULL REFERENCES ops.dq_check (check_id) ON DELETE CASCADE,
    table_name  text   NOT NULL,
    row_count   bigint NOT NULL,
    PRIMARY KEY (check_id, table_name)
);

-- An explicit decision to build on a rejected run anyway: who, when, why.
CREATE TABLE ops.run_acceptance (
    run_id       bigint      NOT NULL REFERENCES ops.ingest_run (run_id),
    accepted_by  text        NOT NULL,
    accepted_at  timestamptz NOT NULL DEFAULT now(),
    reason       text,
    PRIMARY KEY (run_id, accepted_at)
);
