"""The EHRMamba model."""
