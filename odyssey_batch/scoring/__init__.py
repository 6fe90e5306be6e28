"""Nightly risk scoring."""
