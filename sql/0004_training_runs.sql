-- odyssey-batch warehouse, version 4: model training runs.

CREATE TABLE ops.training_run (
    training_run_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind               text        NOT NULL CHECK (kind IN ('pretrain', 'finetune')),
    status             text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    dataset_version_id bigint      NOT NULL REFERENCES ops.dataset_version (dataset_version_id),
    preset             text        NOT NULL,
    backend            text        NOT NULL,   -- the selective-scan backend: cuda, torch, reference
    device             text        NOT NULL,   -- cpu, cuda:0 (x world size)
    world_size         integer     NOT NULL DEFAULT 1,
    seed               integer     NOT NULL,
    options            jsonb       NOT NULL,   -- model config and training options
    started_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    steps              integer     NOT NULL DEFAULT 0,
    tokens             bigint      NOT NULL DEFAULT 0,
    tokens_per_s       double precision,
    train_loss         double precision,   -- mean over the last steps
    val_loss           double precision,
    artifact_uri       text,                -- the last checkpoint
    parent_run_id      bigint REFERENCES ops.training_run (training_run_id),  -- the pretraining run finetuned
    error              text
);
