"""A source profile: how one FHIR source expresses what the pipeline needs, so that the core rules stay generic.

A profile is a TOML file (the packaged ``generic.toml`` and ``mimic-iv.toml``; a hospital writes its own and
points ``ODYSSEY_SOURCE_PROFILE`` or ``odyssey-batch ingest --profile`` at its path). It says:

* ``detect``: ``meta.profile`` URL prefixes that identify the source when no profile is set;
* ``timezone``: the zone of dates and times written without one (a date-only death is a calendar date there);
* ``shifted_dates``: dates shifted for de-identification (MIMIC's run 2110-2210): "in the future" is then
  judged against the data itself, never against the clock, and so is the end of the data (label censoring);
* ``[admission]``: which Encounters are hospital admissions (class codes, ``meta.profile`` URLs, presence of
  ``hospitalization``), that an Encounter with ``partOf`` is a sub-encounter (an ICU stay) of its admission,
  and which discharge dispositions mean a death during the stay;
* ``[events]``: when a Condition without onset or recorded date became known (``encounter_start`` or
  ``encounter_end``), and what becomes of events outside every encounter (``drop``, or ``day``: one outpatient
  visit per calendar day in the source's zone);
* ``[medications]``: ``mix``: what a MedicationRequest referencing a Medication without a code of its own (a mix
  of ingredients, MIMIC's MedicationMix) gets: ``exclude`` (reason ``medication-without-code``) or
  ``first_ingredient`` (the code of its first ingredient with one: the drug, not its diluent);
* ``[code_systems]``: local code-system URLs -> the warehouse's short names (``ICD9CM``, ``LOINC``, or a new
  name such as ``MIMIC_LABITEM``); the data-quality gate allows the names a run's profile maps to.

Everything here is pure; the profile a run used is recorded on ``ops.ingest_run`` and ``ops.dataset_version``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CONDITION_TIMES = ("encounter_start", "encounter_end")
MEDICATION_MIXES = ("exclude", "first_ingredient")
OUTSIDE_ENCOUNTERS = ("drop", "day")
_TOP = {
    "name",
    "description",
    "detect",
    "timezone",
    "shifted_dates",
    "admission",
    "events",
    "medications",
    "code_systems",
}
_ADMISSION = {"class_codes", "profiles", "hospitalization", "part_of_is_sub_encounter", "death_dispositions"}
_EVENTS = {"condition_time", "outside_encounters"}
_MEDICATIONS = {"mix"}
BUILTIN = ("generic", "mimic-iv")


@dataclass(frozen=True, eq=False)
class SourceProfile:
    name: str
    ref: str  # what is recorded and loads it again: a built-in name, or the absolute path of a TOML file
    description: str = ""
    detect: tuple[str, ...] = ()
    timezone: str = ""  # "" = the setting ODYSSEY_DEFAULT_TIMEZONE
    shifted_dates: bool = False
    admission_class_codes: frozenset[str] = frozenset({"IMP"})
    admission_profiles: tuple[str, ...] = ()
    admission_hospitalization: bool = False
    part_of_is_sub_encounter: bool = True
    death_dispositions: frozenset[str] = frozenset()
    condition_time: str = "encounter_start"
    outside_encounters: str = "drop"
    medication_mix: str = "exclude"  # a Medication without a code of its own: "first_ingredient" stands for it
    code_systems: dict[str, str] = field(default_factory=dict)  # system URL -> short name

    def zone(self, default: str = "UTC") -> str:
        """The zone of values written without one."""
        return self.timezone or default

    def is_admission(self, encounter: Mapping[str, Any]) -> bool:
        """Whether an Encounter resource is a hospital admission (a sub-encounter never is)."""
        if self.part_of_is_sub_encounter and isinstance(encounter.get("partOf"), dict):
            return False
        klass = encounter.get("class")
        if isinstance(klass, dict) and klass.get("code") in self.admission_class_codes:
            return True
        if self.admission_hospitalization and isinstance(encounter.get("hospitalization"), dict):
            return True
        meta = encounter.get("meta")
        declared = meta.get("profile") if isinstance(meta, dict) else None
        return bool(self.admission_profiles and isinstance(declared, list)
                    and any(p in self.admission_profiles for p in declared))  # fmt: skip

    def died_in_stay(self, disposition: str | None) -> bool:
        return disposition is not None and disposition in self.death_dispositions

    def matches(self, meta_profiles: Iterable[str]) -> bool:
        return any(isinstance(p, str) and p.startswith(prefix) for p in meta_profiles for prefix in self.detect)

    def short_names(self) -> tuple[str, ...]:
        """The warehouse short names this profile maps local code systems to (the gate allows them)."""
        return tuple(sorted(set(self.code_systems.values())))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ref": self.ref,
            "timezone": self.timezone,
            "shifted_dates": self.shifted_dates,
            "admission": {
                "class_codes": sorted(self.admission_class_codes),
                "profiles": list(self.admission_profiles),
                "hospitalization": self.admission_hospitalization,
                "part_of_is_sub_encounter": self.part_of_is_sub_encounter,
                "death_dispositions": sorted(self.death_dispositions),
            },
            "events": {"condition_time": self.condition_time, "outside_encounters": self.outside_encounters},
            "medications": {"mix": self.medication_mix},
            "code_systems": len(self.code_systems),
        }


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false")
    return value


def _unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise ValueError(f"{where}: unknown field(s) {', '.join(extra)}")


def parse_profile(data: Mapping[str, Any], ref: str) -> SourceProfile:
    """A profile from its TOML table; raises ValueError naming the file and the field at fault."""
    where = f"source profile {ref}"
    _unknown(data, _TOP, where)
    name = data.get("name")
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{where}: name must be letters, digits, '-' and '_'")
    timezone = data.get("timezone", "")
    if not isinstance(timezone, str):
        raise ValueError(f"{where}: timezone must be a string (an IANA zone such as America/New_York)")
    if timezone:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"{where}: timezone {timezone!r} is not an IANA time zone") from exc
    admission = data.get("admission", {})
    events = data.get("events", {})
    medications = data.get("medications", {})
    systems = data.get("code_systems", {})
    tables = (
        (admission, _ADMISSION, "admission"),
        (events, _EVENTS, "events"),
        (medications, _MEDICATIONS, "medications"),
    )
    for table, known, label in tables:
        if not isinstance(table, dict):
            raise ValueError(f"{where}: [{label}] must be a table")
        _unknown(table, known, f"{where} [{label}]")
    if not isinstance(systems, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                 and ":" not in v for k, v in systems.items()):  # fmt: skip
        raise ValueError(f"{where}: [code_systems] maps system URLs to short names (strings without ':')")
    condition_time = events.get("condition_time", "encounter_start")
    if condition_time not in CONDITION_TIMES:
        raise ValueError(f"{where}: [events] condition_time must be one of {', '.join(CONDITION_TIMES)}")
    outside = events.get("outside_encounters", "drop")
    if outside not in OUTSIDE_ENCOUNTERS:
        raise ValueError(f"{where}: [events] outside_encounters must be one of {', '.join(OUTSIDE_ENCOUNTERS)}")
    mix = medications.get("mix", "exclude")
    if mix not in MEDICATION_MIXES:
        raise ValueError(f"{where}: [medications] mix must be one of {', '.join(MEDICATION_MIXES)}")
    description = data.get("description", "")
    return SourceProfile(
        name=name,
        ref=ref,
        description=description if isinstance(description, str) else "",
        detect=_strings(data.get("detect", []), f"{where}: detect"),
        timezone=timezone,
        shifted_dates=_bool(data.get("shifted_dates", False), f"{where}: shifted_dates"),
        admission_class_codes=frozenset(_strings(admission.get("class_codes", ["IMP"]), f"{where}: class_codes")),
        admission_profiles=_strings(admission.get("profiles", []), f"{where}: [admission] profiles"),
        admission_hospitalization=_bool(admission.get("hospitalization", False), f"{where}: hospitalization"),
        part_of_is_sub_encounter=_bool(admission.get("part_of_is_sub_encounter", True), f"{where}: part_of"),
        death_dispositions=frozenset(_strings(admission.get("death_dispositions", []), f"{where}: dispositions")),
        condition_time=condition_time,
        outside_encounters=outside,
        medication_mix=mix,
        code_systems=dict(systems),
    )


def _read(path: Path, ref: str) -> SourceProfile:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ValueError(f"source profile {ref}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"source profile {ref} is not valid TOML: {exc}") from exc
    return parse_profile(data, ref)


@lru_cache(maxsize=32)
def load_profile(name_or_path: str | None) -> SourceProfile:
    """A built-in profile by name (``generic``, ``mimic-iv``) or a hospital's TOML file by path; empty: generic."""
    if not name_or_path:
        return GENERIC
    if name_or_path in BUILTIN:
        return _read(Path(str(resources.files("odyssey_batch.profiles") / f"{name_or_path}.toml")), name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix != ".toml" and not path.exists():
        raise ValueError(f"unknown source profile {name_or_path!r}: use one of {', '.join(BUILTIN)} or a .toml path")
    return _read(path, str(path.resolve()))


def builtin_profiles() -> list[SourceProfile]:
    return [load_profile(name) for name in BUILTIN]


def detect_profile(meta_profiles: Iterable[str]) -> SourceProfile:
    """The built-in profile whose ``detect`` prefixes match one of the given ``meta.profile`` URLs, else generic."""
    seen = list(meta_profiles)
    for profile in builtin_profiles():
        if profile.detect and profile.matches(seen):
            return profile
    return GENERIC


GENERIC = SourceProfile(name="generic", ref="generic")
