"""Synthetic FHIR R4 Bulk Data exports with a known hidden risk model (see ``risk``)."""

from odyssey_batch.synth.export import SynthResult, generate

__all__ = ["SynthResult", "generate"]
