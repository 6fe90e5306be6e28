-- odyssey-batch warehouse, version 5: the model registry, evaluations and promotion decisions.

-- One row per registered model: its artifacts live in the object store under models/v<model_version>/.
CREATE TABLE ops.model_version (
    model_version      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at         timestamptz NOT NULL DEFAULT now(),
    parent_version     integer REFERENCES ops.model_version (model_version),  -- the model it was trained from
    dataset_version    bigint      NOT NULL REFERENCES ops.dataset_version (dataset_version_id),
    training_run_id    bigint      REFERENCES ops.training_run (training_run_id),
    preset             text        NOT NULL,
    config             jsonb       NOT NULL,   -- model config and training options
    metrics            jsonb       NOT NULL DEFAULT '{}',  -- summary numbers; champion_version it was compared to
    status             text        NOT NULL DEFAULT 'candidate'
                                   CHECK (status IN ('candidate', 'champion', 'retired')),
    status_reason      text,                   -- why it has its status (or why its promotion was refused)
    status_changed_at  timestamptz NOT NULL DEFAULT now(),
    artifact_uri       text        NOT NULL,   -- the folder holding manifest.json and the files
    checksum           text        NOT NULL    -- sha256 of manifest.json
);
-- At most one champion, whatever the code does.
CREATE UNIQUE INDEX model_version_one_champion_idx ON ops.model_version (status) WHERE status = 'champion';

-- Evaluation numbers of a model version per task. method 'champion' is the current champion scored on this
-- version's own test points (the promotion comparison); metric 'f1_tuned' is F1 at the validation-chosen threshold.
CREATE TABLE ops.model_evaluation (
    model_version  integer          NOT NULL REFERENCES ops.model_version (model_version),
    task           text             NOT NULL,
    split          text             NOT NULL CHECK (split IN ('validation', 'test')),
    method         text             NOT NULL
                                    CHECK (method IN ('model', 'single_task', 'logreg', 'gbt', 'oracle', 'champion')),
    metric         text             NOT NULL CHECK (metric IN ('auroc', 'auprc', 'f1', 'f1_tuned', 'brier', 'ece')),
    value          double precision,   -- NULL when undefined (e.g. AUROC with one class)
    ci_low         double precision,
    ci_high        double precision,
    std            double precision,   -- across seeds
    seeds          integer          NOT NULL DEFAULT 1,
    n_positive     integer,
    n_negative     integer,
    evaluated_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version, task, split, method, metric)
);

-- Every promotion decision, automatic or manual. For 'rollback', model_version is the version restored and
-- previous_champion the one retired; for 'refuse', previous_champion is the champion it was compared to.
CREATE TABLE ops.model_promotion (
    promotion_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                 timestamptz NOT NULL DEFAULT now(),
    action             text        NOT NULL CHECK (action IN ('promote', 'refuse', 'manual_promote', 'rollback')),
    model_version      integer     NOT NULL REFERENCES ops.model_version (model_version),
    previous_champion  integer     REFERENCES ops.model_version (model_version),
    actor              text        NOT NULL,
    reason             text        NOT NULL,
    details            jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX model_promotion_version_idx ON ops.model_promotion (model_version, promotion_id);
