"""odyssey-batch: FHIR exports -> Postgres warehouse -> EHRMamba -> nightly risk scores in SQL."""

__version__ = "0.1.0"
