"""Stage 1: FHIR R4 exports (Bulk Data NDJSON, Bundles; folder or S3) into the Postgres warehouse."""

from odyssey_batch.ingest.run import IngestResult, begin_run, commit_run, ingest, stage_files

__all__ = ["IngestResult", "begin_run", "commit_run", "ingest", "stage_files"]
