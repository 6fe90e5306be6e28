"""A trainer's state (optimizer, schedule, random state, counters) as safetensors plus JSON, never a pickle.

``encode`` splits a tree of dicts, lists, tuples, strings, numbers, booleans, None and tensors into the tensors
(stored with safetensors: raw bytes, dtype and shape, nothing executable) and a JSON structure that refers to
them by name; ``decode`` puts it back together. The round trip is exact: tensors keep their dtype and bits,
floats are written as their shortest exact repr, tuples stay tuples and integer keys stay integers (the
optimizer's state is keyed by parameter index), so a resumed run continues bit for bit.

Encoded forms that plain JSON cannot carry are one-key objects whose key starts with ``$``:
``{"$tensor": name}``, ``{"$tuple": [...]}``, ``{"$map": [[key, value], ...]}`` (a dict whose keys are not
all strings, or a string key starting with ``$``) and ``{"$float": "inf" | "-inf" | "nan"}``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The JSON structure of ``tree`` and its tensors (CPU, contiguous copies), named ``t0``, ``t1``, ..."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous().clone()
            return {"$tensor": name}
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if isinstance(value, tuple):
            return {"$tuple": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: walk(v) for k, v in value.items()}
            return {"$map": [[walk(k), walk(v)] for k, v in value.items()]}
        raise TypeError(f"cannot store a {type(value).__name__} in a trainer state")

    return walk(tree), tensors


def decode(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The tree ``encode`` split into ``structure`` and ``tensors``; ValueError when they do not fit."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, inner),) = value.items()
            if key == "$tensor":
                if inner not in tensors:
                    raise ValueError(f"the trainer state refers to a tensor {inner!r} it does not hold")
                return tensors[inner]
            if key == "$tuple":
                return tuple(walk(v) for v in inner)
            if key == "$map":
                return {walk(k): walk(v) for k, v in inner}
            if key == "$float":
                return _FLOATS[inner]
        if any(k.startswith("$") for k in value):
            raise ValueError(f"unknown encoded form {sorted(value)} in a trainer state")
        return {k: walk(v) for k, v in value.items()}

    return walk(structure)
