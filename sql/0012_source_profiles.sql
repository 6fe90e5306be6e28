-- odyssey-batch warehouse, version 12: source profiles (odyssey_batch/profiles).
--
-- The profile an ingest run used (a built-in name or the path of a hospital's TOML file) and whether its dates
-- are shifted for de-identification; for such a run, data_end is the latest time its own data holds, against
-- which the gate judges "in the future" (never the clock). A dataset version records the profile it was built
-- with. Encounters record whether the profile calls them a hospital admission, the admission a sub-encounter
-- (an ICU stay) is part of, and the discharge disposition (and whether it means a death in the stay).
-- A patient's death_date_only: deceasedDateTime was a date (death_time is then that date's first instant in
-- the source's zone). Safe to re-apply.

ALTER TABLE ops.ingest_run ADD COLUMN IF NOT EXISTS source_profile text;
ALTER TABLE ops.ingest_run ADD COLUMN IF NOT EXISTS shifted_dates boolean NOT NULL DEFAULT false;
ALTER TABLE ops.ingest_run ADD COLUMN IF NOT EXISTS data_end timestamptz;
ALTER TABLE ops.dataset_version ADD COLUMN IF NOT EXISTS source_profile text;

ALTER TABLE ehr.encounter ADD COLUMN IF NOT EXISTS admission boolean;
ALTER TABLE ehr.encounter ADD COLUMN IF NOT EXISTS part_of text;
ALTER TABLE ehr.encounter ADD COLUMN IF NOT EXISTS discharge_disposition text;
ALTER TABLE ehr.encounter ADD COLUMN IF NOT EXISTS died_in_stay boolean;
ALTER TABLE ehr.patient ADD COLUMN IF NOT EXISTS death_date_only boolean;

CREATE INDEX IF NOT EXISTS encounter_part_of_idx ON ehr.encounter (part_of) WHERE part_of IS NOT NULL;

-- No new table or schema: the grants of 0011 (and its default privileges) already cover these columns.
