"""The task registry: clinical prediction tasks declared as data (``tasks.toml``), not code.

The packaged ``tasks.toml`` defines the default six; ``ODYSSEY_TASKS_FILE`` points at a hospital's own file
with the same layout. Definitions are validated when loaded, with a message that names the task and field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

TRIGGERS = ("discharge", "admission")
OUTCOMES = ("death", "admission", "stay_longer", "diagnosis")


@dataclass(frozen=True)
class CodeSet:
    name: str
    exact: dict[str, frozenset[str]]  # system -> normalized codes
    prefixes: dict[str, tuple[str, ...]]  # system -> normalized prefixes

    @classmethod
    def from_toml(cls, name: str, data: dict[str, list[str]]) -> CodeSet:
        exact: dict[str, frozenset[str]] = {}
        prefixes: dict[str, tuple[str, ...]] = {}
        for system, codes in data.items():
            if not isinstance(codes, list) or not all(isinstance(c, str) and c for c in codes):
                raise ValueError(f"code set {name!r}: {system} must be a list of codes")
            exact[system] = frozenset(normalize_code(c) for c in codes if not c.endswith("*"))
            prefixes[system] = tuple(normalize_code(c[:-1]) for c in codes if c.endswith("*"))
        return cls(name, exact, prefixes)

    def matches(self, system: str, code: str) -> bool:
        code = normalize_code(code)
        return code in self.exact.get(system, ()) or code.startswith(self.prefixes.get(system, ()) or ("\0",))

    def contains(self, token_code: str) -> bool:
        """Whether an event code ``SYSTEM:code`` belongs to the set."""
        system, _, code = token_code.rpartition(":")
        return self.matches(system, code)


def normalize_code(code: str) -> str:
    return code.replace(".", "").strip().upper()


@dataclass(frozen=True)
class Task:
    name: str
    trigger: str
    outcome: str
    days: float
    description: str = ""
    offset_hours: float = 0.0
    min_stay_hours: float = 0.0
    code_set: CodeSet | None = None
    exclude_death_before_outcome: bool = False
    score_lookback_hours: float = 24.0  # nightly scoring: a trigger this recent makes a patient eligible


@dataclass(frozen=True)
class Registry:
    tasks: tuple[Task, ...]
    inpatient_classes: frozenset[str]
    transfer_gap_hours: float
    source: str
    code_sets: dict[str, CodeSet] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "inpatient_classes": sorted(self.inpatient_classes),
            "transfer_gap_hours": self.transfer_gap_hours,
            "tasks": [
                {
                    "name": t.name,
                    "trigger": t.trigger,
                    "outcome": t.outcome,
                    "days": t.days,
                    "offset_hours": t.offset_hours,
                    "min_stay_hours": t.min_stay_hours,
                    "code_set": t.code_set.name if t.code_set else None,
                    "exclude_death_before_outcome": t.exclude_death_before_outcome,
                    "score_lookback_hours": t.score_lookback_hours,
                }
                for t in self.tasks
            ],
        }


def default_tasks_file() -> Path:
    return Path(str(resources.files("odyssey_batch.labels") / "tasks.toml"))


def load_registry(path: str | Path | None = None) -> Registry:
    path = Path(path) if path else default_tasks_file()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ValueError(f"tasks file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"tasks file {path} is not valid TOML: {exc}") from exc
    return parse_registry(data, str(path))


def parse_registry(data: dict[str, Any], source: str = "<memory>") -> Registry:
    stays = data.get("stays", {})
    code_sets = {name: CodeSet.from_toml(name, codes) for name, codes in data.get("code_sets", {}).items()}
    tasks = []
    known = {f for f in Task.__dataclass_fields__}
    for raw in data.get("tasks", []):
        name = raw.get("name")
        if not name or not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ValueError(f"{source}: every task needs a name of letters, digits and underscores ({raw})")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{source}: task {name}: unknown field(s) {', '.join(unknown)}")
        if raw.get("trigger") not in TRIGGERS:
            raise ValueError(f"{source}: task {name}: trigger must be one of {', '.join(TRIGGERS)}")
        if raw.get("outcome") not in OUTCOMES:
            raise ValueError(f"{source}: task {name}: outcome must be one of {', '.join(OUTCOMES)}")
        if not isinstance(raw.get("days"), int | float) or raw["days"] <= 0:
            raise ValueError(f"{source}: task {name}: days must be a positive number")
        lookback = raw.get("score_lookback_hours", 24.0)
        if not isinstance(lookback, int | float) or lookback <= 0:
            raise ValueError(f"{source}: task {name}: score_lookback_hours must be a positive number")
        code_set = None
        if raw["outcome"] == "diagnosis":
            if raw.get("code_set") not in code_sets:
                raise ValueError(f"{source}: task {name}: code_set must name one of [code_sets.*]")
            code_set = code_sets[raw["code_set"]]
        tasks.append(Task(**{**raw, "code_set": code_set}))
    names = [t.name for t in tasks]
    if not tasks or len(set(names)) != len(names):
        raise ValueError(f"{source}: tasks must be a non-empty list of distinct names")
    return Registry(
        tuple(tasks),
        frozenset(stays.get("inpatient_classes", ["IMP"])),
        float(stays.get("transfer_gap_hours", 0.0)),
        source,
        code_sets,
    )
