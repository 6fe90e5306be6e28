"""Evaluating risk models the way a clinical reviewer would: discrimination, calibration, uncertainty."""
