"""Stage 2: the data-quality gate (Great Expectations) between ingest and everything after it."""
