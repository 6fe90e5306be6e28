"""Lab values: one unit per code, and per-code quantile bins fitted on the training split.

Units: a value in a unit with a documented conversion (``quality.checks.LAB_CONVERSIONS``, the table the
data-quality gate accepts) is converted to the code's main unit before binning, so 3% of creatinine results
in µmol/L land in the same bins as the mg/dL ones.

Bins: per lab code, ``n_bins`` quantile bins (5 by default: quintiles) of the training split's values. The
edges are the interior quantiles; duplicate edges collapse, so a code with few distinct values gets fewer bins.
A value equal to an edge goes to the upper bin; values below the first or above the last edge land in the edge
bins: every value has a bin (the reference design sent the maximum to ``[UNK]``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from odyssey_batch.quality.checks import LAB_CONVERSIONS

FIVE_BIN_NAMES = ("very low", "low", "normal", "high", "very high")


def canonical_value(system: str, code: str, unit: str | None, value: float) -> tuple[float, str | None]:
    """The value in the code's main unit (unchanged when no conversion is documented)."""
    if system == "LOINC" and unit is not None:
        conversion = LAB_CONVERSIONS.get((code, unit))
        if conversion is not None:
            return value * conversion[1], conversion[0]
    return value, unit


@dataclass(frozen=True)
class LabBins:
    n_bins: int
    edges: dict[str, tuple[float, ...]]  # lab code (SYSTEM:code) -> interior edges, increasing

    @classmethod
    def fit(cls, values: dict[str, list[float] | np.ndarray], n_bins: int = 5) -> LabBins:
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
        return cls(n_bins, edges)

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
        return {"n_bins": self.n_bins, "edges": {k: list(v) for k, v in self.edges.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> LabBins:
        return cls(int(data["n_bins"]), {k: tuple(v) for k, v in data["edges"].items()})
