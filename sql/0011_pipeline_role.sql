-- odyssey-batch warehouse, version 11: a login that is only a member of odyssey_pipeline runs every command and
-- DAG; nobody but the owner creates objects.
--
-- Commands no longer migrate (only `odyssey-batch db upgrade`, run as the warehouse's owner, does): they read
-- ops.schema_migration to check that the schema is current, and otherwise only read and write rows. So the
-- pipeline needs, in every warehouse schema (fhir, ehr, ops, staging, risk):
--   USAGE on the schema; SELECT, INSERT, UPDATE, DELETE on every table (LOCK TABLE ... IN EXCLUSIVE MODE, which
--   tokenize takes on ehr.task_label, needs UPDATE or DELETE); USAGE, SELECT, UPDATE on every sequence;
--   the same on tables and sequences the owner creates later (default privileges);
--   CONNECT and TEMPORARY on the database (ingest merges through ON COMMIT DROP temporary tables).
-- It gets no CREATE anywhere. ANALYZE needs the owner: run by the pipeline it warns and skips, autovacuum's
-- analyze catches up.
--
-- The grants are repeated here for the tables of migrations 7-10 (and for a migration user other than the one
-- that ran 0006: default privileges belong to the role that sets them). A migration that adds a new schema
-- must grant it to odyssey_pipeline itself.
--
-- PUBLIC may no longer create objects in schema public (PostgreSQL 15 and later do not allow it by default; a
-- warehouse created on 14 or upgraded from it does): a pipeline or analyst login cannot create tables anywhere.

REVOKE CREATE ON SCHEMA public FROM PUBLIC;

GRANT USAGE ON SCHEMA fhir, ehr, ops, staging, risk TO odyssey_pipeline;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA fhir, ehr, ops, staging, risk TO odyssey_pipeline;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA fhir, ehr, ops, staging, risk TO odyssey_pipeline;
ALTER DEFAULT PRIVILEGES IN SCHEMA fhir, ehr, ops, staging, risk
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO odyssey_pipeline;
ALTER DEFAULT PRIVILEGES IN SCHEMA fhir, ehr, ops, staging, risk
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO odyssey_pipeline;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO odyssey_pipeline', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO odyssey_analyst', current_database());
END
$$;
