-- odyssey-batch warehouse, version 14: pulls from a FHIR server's Bulk Data `$export`, and resources a source
-- deleted (the manifest's deleted[]).
--
-- ops.bulk_pull: one row per export job (`odyssey-batch pull`). The status URL is stored as soon as the server
-- accepts the kick-off, so a killed pull resumes polling or downloading instead of starting another export
-- (servers allow one at a time). status: kicking-off -> exporting -> downloading -> complete | failed | cancelled.
-- `--since auto` takes the transaction_time of the latest complete pull with the same server, scope and filters.
--
-- ops.deleted_resource: one row per resource an ingest run deleted from the warehouse because its export listed it
-- in deleted[] (a tombstone: the ids and when, never the body). Its fhir.resource row and ehr rows are gone, so
-- nothing a source retracted keeps being tokenized or scored.
--
-- Safe to apply again (IF NOT EXISTS); the pipeline role gets its rights here too (as in 0011).

CREATE TABLE IF NOT EXISTS ops.bulk_pull (
    pull_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    server           text        NOT NULL,             -- the FHIR base URL, without credentials
    scope            text        NOT NULL,             -- 'system', 'patient' or 'group/<id>'
    filters          text        NOT NULL DEFAULT '',  -- _type and _typeFilter as sent, for --since auto
    request          jsonb       NOT NULL DEFAULT '{}'::jsonb,  -- the kick-off parameters
    since            timestamptz,                      -- the _since sent (NULL: a full export)
    status           text        NOT NULL DEFAULT 'kicking-off'
                     CHECK (status IN ('kicking-off', 'exporting', 'downloading', 'complete', 'failed',
                                       'cancelled')),
    status_url       text,                             -- Content-Location of the kick-off answer
    progress         text,                             -- the last X-Progress
    manifest         jsonb,                            -- the completion manifest
    transaction_time timestamptz,                      -- manifest transactionTime
    destination      text,                             -- the export folder written in the landing location
    files_done       jsonb       NOT NULL DEFAULT '{}'::jsonb,  -- manifest url -> stored file name, when stored
    resources        bigint,                           -- output[].count summed
    started_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at     timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    error            text
);
CREATE INDEX IF NOT EXISTS bulk_pull_server_idx ON ops.bulk_pull (server, scope, status, pull_id DESC);

CREATE TABLE IF NOT EXISTS ops.deleted_resource (
    resource_type  text        NOT NULL,
    resource_id    text        NOT NULL,
    run_id         bigint      NOT NULL REFERENCES ops.ingest_run (run_id) ON DELETE CASCADE,
    deleted_at     timestamptz,                        -- the export's transactionTime (the deletion is before it)
    version_id     text,                               -- the version that was deleted from the warehouse
    last_updated   timestamptz,
    patient_id     text,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (resource_type, resource_id, run_id)
);
CREATE INDEX IF NOT EXISTS deleted_resource_run_idx ON ops.deleted_resource (run_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON ops.bulk_pull, ops.deleted_resource TO odyssey_pipeline;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA ops TO odyssey_pipeline;
