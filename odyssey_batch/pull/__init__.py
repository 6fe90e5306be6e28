"""Pulling exports from a FHIR server's Bulk Data ``$export`` into the landing location (``odyssey-batch pull``).

``auth`` (SMART Backend Services, bearer, none) → ``client`` (kick-off, polling, downloads) → ``landing`` (the
folder ingest reads, complete or absent), with ``state`` (``ops.bulk_pull``) making a killed pull resume;
``run.pull`` ties them together. Nothing here is imported by ``odyssey_batch.pull`` itself, so ingest can read
``landing.INCOMPLETE_MARKER`` without loading the HTTP stack.
"""
