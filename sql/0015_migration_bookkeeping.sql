-- odyssey-batch warehouse, version 15: only the owner writes the migration bookkeeping.
--
-- Migration 11 granted odyssey_pipeline SELECT, INSERT, UPDATE, DELETE on every table in ops, which took in
-- ops.schema_migration: a pipeline login could then mark a migration applied that never ran (or forget one), and
-- every command trusts that table to say the schema is current. The pipeline (and the analyst role, which never
-- had it) keeps reading it: commands check the schema version before they start.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ops.schema_migration FROM odyssey_pipeline;
GRANT SELECT ON ops.schema_migration TO odyssey_pipeline;
