-- odyssey-batch warehouse, version 1: raw FHIR, normalized EHR tables, ingest bookkeeping, staging.
-- Times are timestamptz. FHIR partial dates ('2020', '2020-05') are stored as the first instant of the period
-- in the configured default timezone (UTC unless ODYSSEY_DEFAULT_TIMEZONE says otherwise); see README.

CREATE SCHEMA IF NOT EXISTS fhir;
CREATE SCHEMA IF NOT EXISTS ehr;
CREATE SCHEMA IF NOT EXISTS ops;
CREATE SCHEMA IF NOT EXISTS staging;

-- One row per ingest run. status: running -> succeeded | failed | abandoned (killed; superseded by a later run).
CREATE TABLE ops.ingest_run (
    run_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source           text        NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    status           text        NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned')),
    counts           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    transaction_time timestamptz,            -- Bulk Data manifest transactionTime, when present
    error            text,
    host             text,
    pid              integer
);
CREATE INDEX ingest_run_source_idx ON ops.ingest_run (source, started_at DESC);

-- One row per file of a run, written when the file is fully staged.
CREATE TABLE ops.ingest_file (
    run_id          bigint  NOT NULL REFERENCES ops.ingest_run (run_id) ON DELETE CASCADE,
    file            text    NOT NULL,
    format          text    NOT NULL CHECK (format IN ('ndjson', 'bundle', 'resource', 'export-error')),
    resource_type   text,                     -- from the file name or manifest, when known
    records         integer NOT NULL,         -- resources read (NDJSON lines, Bundle entries)
    staged          integer NOT NULL,         -- passed validation
    quarantined     integer NOT NULL,         -- failed validation (line or file level)
    manifest_count  integer,                  -- manifest output[].count, when listed
    staged_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, file)
);

-- Everything that could not be loaded, with the reason and the original text. Nothing is dropped silently.
-- kind 'line': one NDJSON line / Bundle entry (line_no = 1-based line, or entry index for Bundles);
-- kind 'file': a problem with a whole file (empty, corrupt gzip tail, not JSON); line_no = first line affected.
CREATE TABLE ops.quarantine (
    quarantine_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          bigint  NOT NULL REFERENCES ops.ingest_run (run_id) ON DELETE CASCADE,
    source          text    NOT NULL,
    line_no         integer,
    resource_type   text,
    resource_id     text,
    kind            text    NOT NULL DEFAULT 'line' CHECK (kind IN ('line', 'file')),
    reason          text    NOT NULL,         -- short category, e.g. invalid-json, fhir-validation, orphan-reference
    error           text    NOT NULL,         -- readable explanation
    raw_text        text,                     -- the original text (invalid UTF-8 decoded with U+FFFD)
    raw_bytes       bytea,                    -- the original bytes, only when they were not valid UTF-8
    quarantined_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quarantine_run_idx ON ops.quarantine (run_id, reason);

-- The raw resources: latest version per (type, id).
CREATE TABLE fhir.resource (
    resource_type  text        NOT NULL,
    resource_id    text        NOT NULL,
    version_id     text,
    last_updated   timestamptz,
    body           jsonb       NOT NULL,
    run_id         bigint      NOT NULL REFERENCES ops.ingest_run (run_id),
    source         text        NOT NULL,
    line_no        integer     NOT NULL,
    patient_id     text,                      -- the Patient this resource belongs to, when it has one
    loaded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (resource_type, resource_id)
);
CREATE INDEX resource_patient_idx ON fhir.resource (patient_id) WHERE patient_id IS NOT NULL;
CREATE INDEX resource_run_idx ON fhir.resource (run_id);

CREATE TABLE ehr.patient (
    patient_id   text PRIMARY KEY,
    birth_date   date,
    gender       text,
    deceased     boolean NOT NULL DEFAULT false,
    death_time   timestamptz,
    run_id       bigint NOT NULL
);

CREATE TABLE ehr.encounter (
    encounter_id  text PRIMARY KEY,
    patient_id    text NOT NULL REFERENCES ehr.patient (patient_id),
    class_code    text,                       -- v3 ActCode: AMB, EMER, IMP, ...
    type_code     text,
    type_system   text,
    type_display  text,
    status        text,
    start_time    timestamptz,
    end_time      timestamptz,
    run_id        bigint NOT NULL
);
CREATE INDEX encounter_patient_idx ON ehr.encounter (patient_id, start_time);

CREATE TABLE ehr.condition (
    condition_id     text PRIMARY KEY,
    patient_id       text NOT NULL REFERENCES ehr.patient (patient_id),
    encounter_id     text REFERENCES ehr.encounter (encounter_id) ON DELETE SET NULL,
    code_system      text NOT NULL,
    code             text NOT NULL,
    display          text,
    onset_time       timestamptz,
    recorded_time    timestamptz,
    abatement_time   timestamptz,
    clinical_status  text,
    run_id           bigint NOT NULL
);
CREATE INDEX condition_patient_idx ON ehr.condition (patient_id);

CREATE TABLE ehr.procedure (
    procedure_id    text PRIMARY KEY,
    patient_id      text NOT NULL REFERENCES ehr.patient (patient_id),
    encounter_id    text REFERENCES ehr.encounter (encounter_id) ON DELETE SET NULL,
    code_system     text NOT NULL,
    code            text NOT NULL,
    display         text,
    performed_time  timestamptz,
    status          text,
    run_id          bigint NOT NULL
);
CREATE INDEX procedure_patient_idx ON ehr.procedure (patient_id);

CREATE TABLE ehr.medication_request (
    medication_request_id  text PRIMARY KEY,
    patient_id             text NOT NULL REFERENCES ehr.patient (patient_id),
    encounter_id           text REFERENCES ehr.encounter (encounter_id) ON DELETE SET NULL,
    code_system            text NOT NULL,
    code                   text NOT NULL,
    display                text,
    authored_time          timestamptz,
    status                 text,
    intent                 text,
    medication_id          text,             -- the Medication resource, when referenced by medicationReference
    run_id                 bigint NOT NULL
);
CREATE INDEX medication_request_patient_idx ON ehr.medication_request (patient_id);

CREATE TABLE ehr.observation (
    observation_id  text PRIMARY KEY,
    patient_id      text NOT NULL REFERENCES ehr.patient (patient_id),
    encounter_id    text REFERENCES ehr.encounter (encounter_id) ON DELETE SET NULL,
    category        text,                     -- 'laboratory' when any category says so, else the first one
    code_system     text NOT NULL,
    code            text NOT NULL,
    display         text,
    effective_time  timestamptz,
    value_num       double precision,
    unit            text,                     -- UCUM code when given, else the unit text
    value_text      text,
    status          text,
    run_id          bigint NOT NULL
);
CREATE INDEX observation_patient_idx ON ehr.observation (patient_id, effective_time);
CREATE INDEX observation_code_idx ON ehr.observation (code_system, code);

-- Observation.component (e.g. systolic and diastolic blood pressure), one row per coded component.
CREATE TABLE ehr.observation_component (
    observation_id  text     NOT NULL REFERENCES ehr.observation (observation_id) ON DELETE CASCADE,
    seq             smallint NOT NULL,
    code_system     text     NOT NULL,
    code            text     NOT NULL,
    display         text,
    value_num       double precision,
    unit            text,
    value_text      text,
    PRIMARY KEY (observation_id, seq)
);

-- Staging: validated resources of runs in progress. Invisible to analysts; merged in one transaction.
CREATE UNLOGGED TABLE staging.resource (
    run_id          bigint  NOT NULL,
    file_no         integer NOT NULL,
    line_no         integer NOT NULL,
    source          text    NOT NULL,
    resource_type   text    NOT NULL,
    resource_id     text    NOT NULL,
    version_id      text,
    last_updated    timestamptz,
    patient_ref     text,
    encounter_ref   text,
    medication_ref  text,
    ehr             jsonb,                   -- the normalized row, for the types that have an ehr table
    ehr_skipped     text,                    -- why such a resource has no normalized row (no-code, no-patient)
    components      jsonb,
    body            jsonb   NOT NULL
);

CREATE UNLOGGED TABLE staging.quarantine (
    run_id         bigint  NOT NULL,
    source         text    NOT NULL,
    line_no        integer,
    resource_type  text,
    resource_id    text,
    kind           text    NOT NULL,
    reason         text    NOT NULL,
    error          text    NOT NULL,
    raw_text       text,
    raw_bytes      bytea
);
