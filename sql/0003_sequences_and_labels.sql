-- odyssey-batch warehouse, version 3: token-sequence datasets and clinical task labels.

-- One row per `odyssey-batch tokenize`: a versioned dataset in the object store (Parquet shards + manifest).
CREATE TABLE ops.dataset_version (
    dataset_version_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status        text        NOT NULL DEFAULT 'building' CHECK (status IN ('building', 'ready', 'failed')),
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    location      text,                 -- where the manifest and shards live (folder or s3://…)
    source_runs   bigint[]    NOT NULL, -- the ingest runs it was built from (validated or accepted)
    data_end      timestamptz,          -- the end of the data: labels whose window runs past it are censored
    patients      integer,
    tokens        bigint,
    vocab_size    integer,
    max_length    integer,
    summary       jsonb,                -- counts, unknown-token rates, label counts (the manifest has it all)
    error         text
);

-- The MEDS-style label contract: one row per prediction point of a task, from the latest ready dataset.
-- label is NULL when the outcome window runs past the end of the data (censored).
CREATE TABLE ehr.task_label (
    task                text        NOT NULL,
    patient_id          text        NOT NULL,
    prediction_time     timestamptz NOT NULL,
    label               boolean,
    split               text        NOT NULL CHECK (split IN ('train', 'validation', 'test')),
    index_encounter_id  text        NOT NULL,
    censored            boolean     NOT NULL,
    window_end          timestamptz NOT NULL,
    dataset_version_id  bigint      NOT NULL REFERENCES ops.dataset_version (dataset_version_id),
    PRIMARY KEY (task, patient_id, prediction_time)
);
CREATE INDEX task_label_patient_idx ON ehr.task_label (patient_id);
