"""Exact conversions between UCUM units: a small parser over a table of prefixes and atoms (no molar masses).

Two units convert when they reduce to the same dimension; the factor is then exact (a ``Fraction``): ``mg/dL``
→ ``g/L`` is 1/100, ``umol/L`` → ``mmol/L`` 1/1000, ``10*3/uL`` → ``10*9/L`` 1, ``[lb_av]`` → ``kg``
0.45359237, ``%`` → ``1`` (``L/L``) 1/100. Nothing needing a substance's molar mass or a valence converts
(``mg/dL`` ↔ ``mmol/L``, ``mmol/L`` ↔ ``meq/L``: those are per-code, in ``quality.checks.LAB_CONVERSIONS``),
nor anything affine (``Cel`` ↔ ``[degF]``), nor units defined by measurement (``mm[Hg]`` ↔ ``kPa``), nor arbitrary
units (``[IU]``, ``U``) into each other. Annotations (``{1.73_m2}``) must match. A unit this table does not know
(free text, parentheses) converts to nothing but itself.

No UCUM library is on the package index this project can lock; the table covers the units of laboratory results
(mass, substance, count, catalytic and arbitrary units per volume, lengths, masses, times, fractions).
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

Dimension = tuple[tuple[str, int], ...]

PREFIXES = {
    "G": Fraction(10**9),
    "M": Fraction(10**6),
    "k": Fraction(1000),
    "h": Fraction(100),
    "da": Fraction(10),
    "d": Fraction(1, 10),
    "c": Fraction(1, 100),
    "m": Fraction(1, 1000),
    "u": Fraction(1, 10**6),
    "n": Fraction(1, 10**9),
    "p": Fraction(1, 10**12),
    "f": Fraction(1, 10**15),
}

# atom -> (factor to the base, base dimension, whether it takes a prefix)
ATOMS: dict[str, tuple[Fraction, dict[str, int], bool]] = {
    "g": (Fraction(1), {"g": 1}, True),
    "L": (Fraction(1, 1000), {"m": 3}, True),
    "l": (Fraction(1, 1000), {"m": 3}, True),
    "m": (Fraction(1), {"m": 1}, True),
    "mol": (Fraction(1), {"mol": 1}, True),
    "eq": (Fraction(1), {"eq": 1}, True),
    "U": (Fraction(1), {"U": 1}, True),
    "[IU]": (Fraction(1), {"IU": 1}, True),
    "[iU]": (Fraction(1), {"IU": 1}, True),
    "kat": (Fraction(1), {"kat": 1}, True),
    "s": (Fraction(1), {"s": 1}, True),
    "min": (Fraction(60), {"s": 1}, False),
    "h": (Fraction(3600), {"s": 1}, False),
    "d": (Fraction(86400), {"s": 1}, False),
    "wk": (Fraction(604800), {"s": 1}, False),
    "[lb_av]": (Fraction("453.59237"), {"g": 1}, False),
    "[oz_av]": (Fraction("28.349523125"), {"g": 1}, False),
    "[in_i]": (Fraction("0.0254"), {"m": 1}, False),
    "[ft_i]": (Fraction("0.3048"), {"m": 1}, False),
    "%": (Fraction(1, 100), {}, False),
    "1": (Fraction(1), {}, False),
    "m[Hg]": (Fraction(1), {"m[Hg]": 1}, True),
    "m[H2O]": (Fraction(1), {"m[H2O]": 1}, True),
    "Pa": (Fraction(1), {"Pa": 1}, True),
    "Cel": (Fraction(1), {"Cel": 1}, False),
    "[degF]": (Fraction(1), {"[degF]": 1}, False),
    "K": (Fraction(1), {"K": 1}, False),
    "[pH]": (Fraction(1), {"[pH]": 1}, False),
}

_TERM = re.compile(r"\{[^{}]*\}|[^./{}]+")
_POWER = re.compile(r"^10[*^](-?\d+)$")
_EXPONENT = re.compile(r"^(.*?[^\d-])(-?\d+)$")


def _atom(text: str) -> tuple[Fraction, dict[str, int]] | None:
    """One term without operators: ``mg``, ``cm2``, ``10*3``, ``24``, ``{1.73_m2}``."""
    if text.startswith("{"):
        return Fraction(1), {text: 1}
    power = _POWER.match(text)
    if power:
        return Fraction(10) ** int(power.group(1)), {}
    if text.isdigit():
        return Fraction(int(text)), {}
    exponent = 1
    if text not in ATOMS:
        found = _EXPONENT.match(text)
        if found and not found.group(1).endswith(("*", "^")):
            text, exponent = found.group(1), int(found.group(2))
    base = _prefixed(text)
    if base is None:
        return None
    factor, dims = base
    return factor**exponent, {k: v * exponent for k, v in dims.items()}


def _prefixed(text: str) -> tuple[Fraction, dict[str, int]] | None:
    if text in ATOMS:
        factor, dims, _ = ATOMS[text]
        return factor, dims
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if text.startswith(prefix) and text[len(prefix) :] in ATOMS:
            factor, dims, prefixable = ATOMS[text[len(prefix) :]]
            if prefixable:
                return PREFIXES[prefix] * factor, dims
    return None


@lru_cache(maxsize=4096)
def parse(unit: str) -> tuple[Fraction, Dimension] | None:
    """A unit's factor to its base and its dimension, or None when this table cannot read it."""
    text = unit.strip()
    if not text or "(" in text or " " in text:
        return None
    factor, dims = Fraction(1), {}
    position, sign = 0, 1
    if text.startswith("/"):
        position = 1
        sign = -1
    while position < len(text):
        term = _TERM.match(text, position)
        if term is None:
            return None
        read = _atom(term.group(0))
        if read is None:
            return None
        term_factor, term_dims = read
        factor *= term_factor if sign > 0 else 1 / term_factor
        for key, power in term_dims.items():
            dims[key] = dims.get(key, 0) + sign * power
        position = term.end()
        if position < len(text):
            operator = text[position]
            if operator not in "./":
                return None
            sign = 1 if operator == "." else -1
            position += 1
            if position == len(text):
                return None
    return factor, tuple(sorted((k, v) for k, v in dims.items() if v))


def factor(source: str, target: str) -> float | None:
    """The exact factor that turns a value in ``source`` into one in ``target``, or None when they do not convert."""
    if source == target:
        return 1.0
    a, b = parse(source), parse(target)
    if a is None or b is None or a[1] != b[1]:
        return None
    return float(a[0] / b[0])
