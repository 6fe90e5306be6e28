-- odyssey-batch warehouse, version 10: every resource of an ingest run accounted for, per type.
--
-- For each run and resource type: read = normalized + excluded + quarantined + unchanged, where
--   normalized   loaded into fhir.resource and written to its ehr.* table;
--   excluded     loaded into fhir.resource (kept raw) but given no ehr.* row, for a reason in ops.ingest_exclusion
--                (no-patient, no-code, text-only-code, unresolved-medication, medication-without-code, or
--                not-modelled for the types that have no ehr table);
--   quarantined  refused, one row each in ops.quarantine;
--   unchanged    identical to the version already stored.
-- Written in the run's merge transaction, so a run that did not succeed has no rows here.

CREATE TABLE ops.ingest_type_count (
    run_id         bigint  NOT NULL REFERENCES ops.ingest_run (run_id) ON DELETE CASCADE,
    resource_type  text    NOT NULL,           -- 'unknown' for lines that named no type (invalid JSON, ...)
    read           integer NOT NULL,
    normalized     integer NOT NULL,
    excluded       integer NOT NULL,
    quarantined    integer NOT NULL,
    unchanged      integer NOT NULL,
    PRIMARY KEY (run_id, resource_type),
    CHECK (read = normalized + excluded + quarantined + unchanged)
);

CREATE TABLE ops.ingest_exclusion (
    run_id         bigint  NOT NULL REFERENCES ops.ingest_run (run_id) ON DELETE CASCADE,
    resource_type  text    NOT NULL,
    reason         text    NOT NULL,
    resources      integer NOT NULL CHECK (resources > 0),
    PRIMARY KEY (run_id, resource_type, reason)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON ops.ingest_type_count, ops.ingest_exclusion TO odyssey_pipeline;
