"""Lab values: one unit per code where units convert, per-(code, unit) bins where they do not, and quantile bins
fitted on the training split.

Units: a value in a unit with a documented per-code conversion (``quality.checks.LAB_CONVERSIONS``, those that
need a molar mass) is converted to the code's main unit first (``canonical_value``), so 3% of creatinine results
in µmol/L land in the same bins as the mg/dL ones. Then ``LabUnits`` (fitted on the warehouse before a dataset
is built, stored with its bins) gives each code its main unit: the most frequent unit of its largest group of
mutually convertible units. A value in another unit that UCUM converts exactly (``sequences.ucum``: ``g/L`` →
``mg/dL``, ``umol/L`` → ``mmol/L``) is converted to it; one that does not convert is a lab of its own, binned
per (code, unit): its code becomes ``SYSTEM:code[unit]`` and its tokens ``lab:SYSTEM:code[unit]:qN``. A code
with one unit keeps ``lab:SYSTEM:code:qN``. At scoring, the model's units decide: a unit the model never saw for
a code is its own lab, out of the vocabulary.

Bins: per lab code, ``n_bins`` quantile bins (5 by default: quintiles) of the training split's values. The
edges are the interior quantiles; duplicate edges collapse, so a code with few distinct values gets fewer bins.
A value equal to an edge goes to the upper bin; values below the first or above the last edge land in the edge
bins: every value has a bin (the reference design sent the maximum to ``[UNK]``).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from odyssey_batch.quality.checks import LAB_CONVERSIONS
from odyssey_batch.sequences import ucum

FIVE_BIN_NAMES = ("very low", "low", "normal", "high", "very high")


def canonical_value(system: str, code: str, unit: str | None, value: float) -> tuple[float, str | None]:
    """The value in the code's main unit (unchanged when no conversion is documented)."""
    if system == "LOINC" and unit is not None:
        conversion = LAB_CONVERSIONS.get((code, unit))
        if conversion is not None:
            return value * conversion[1], conversion[0]
    return value, unit


@dataclass(frozen=True)
class LabUnits:
    """Each numeric lab code's main unit (``SYSTEM:code`` -> unit)."""

    main: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fit(cls, counts: Mapping[tuple[str, str], int]) -> LabUnits:
        """``counts``: numeric results per (code, unit), units after ``canonical_value``. The main unit is the most
        frequent unit of the code's heaviest group of mutually convertible units (ties: the unit's text)."""
        per_code: dict[str, list[tuple[str, int]]] = {}
        for (code, unit), n in counts.items():
            per_code.setdefault(code, []).append((unit, n))
        main = {}
        for code in sorted(per_code):
            units = sorted(per_code[code], key=lambda u: (-u[1], u[0]))
            groups: list[list[tuple[str, int]]] = []
            for unit, n in units:
                group = next((g for g in groups if ucum.factor(unit, g[0][0]) is not None), None)
                if group is None:
                    groups.append([(unit, n)])
                else:
                    group.append((unit, n))
            heaviest = max(groups, key=lambda g: sum(n for _, n in g))  # the first of equals: the most frequent unit
            main[code] = heaviest[0][0]
        return cls(main)

    def place(self, code: str, unit: str | None, value: float) -> tuple[str, float, str | None]:
        """A numeric result's lab (``code``, or ``code[unit]`` for a unit that does not convert to the code's main
        unit), its value and its unit after conversion."""
        main = self.main.get(code)
        if main is None or unit is None or unit == main:
            return code, value, unit
        factor = ucum.factor(unit, main)
        if factor is not None:
            return code, value * factor, main
        return f"{code}[{unit}]", value, unit


@dataclass(frozen=True)
class LabBins:
    n_bins: int
    edges: dict[str, tuple[float, ...]]  # lab (SYSTEM:code, or SYSTEM:code[unit]) -> interior edges, increasing
    units: LabUnits = field(default_factory=LabUnits)  # how results were placed in labs when the bins were fitted

    @classmethod
    def fit(cls, values: dict[str, list[float] | np.ndarray], n_bins: int = 5,
            units: LabUnits | None = None) -> LabBins:  # fmt: skip
        if n_bins < 1:
            raise ValueError("a lab needs at least one bin")
        quantiles = np.arange(1, n_bins) / n_bins
        edges = {}
        for code in sorted(values):
            data = np.asarray(values[code], dtype=np.float64)
            data = data[np.isfinite(data)]
            if data.size == 0 or n_bins == 1:
                edges[code] = ()
                continue
            found = np.unique(np.quantile(data, quantiles, method="linear"))
            edges[code] = tuple(float(x) for x in found)
        return cls(n_bins, edges, units or LabUnits())

    def bin(self, code: str, value: float) -> int:
        """The bin of a value: 0 .. len(edges); codes never seen in training have one bin (0)."""
        return bisect.bisect_right(self.edges.get(code, ()), value)

    def bins_of(self, code: str) -> int:
        return len(self.edges.get(code, ())) + 1

    def describe(self, code: str, index: int) -> str:
        """A clinician's name for a bin: very low .. very high for quintiles, else 'bin k of n'."""
        count = self.bins_of(code)
        if count == 5:
            return FIVE_BIN_NAMES[index]
        return f"bin {index + 1} of {count}"

    def as_dict(self) -> dict:
        return {"n_bins": self.n_bins, "edges": {k: list(v) for k, v in self.edges.items()}, "units": self.units.main}

    @classmethod
    def from_dict(cls, data: dict) -> LabBins:  # datasets and models made before units were kept have none
        return cls(int(data["n_bins"]), {k: tuple(v) for k, v in data["edges"].items()},
                   LabUnits(dict(data.get("units", {}))))  # fmt: skip
