"""Source profiles: how one FHIR source expresses what the pipeline needs (see ``profile.py``)."""

from odyssey_batch.profiles.profile import (
    GENERIC,
    SourceProfile,
    builtin_profiles,
    detect_profile,
    load_profile,
)

__all__ = ["GENERIC", "SourceProfile", "builtin_profiles", "detect_profile", "load_profile"]
