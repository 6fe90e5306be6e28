"""The vocabulary: fixed special ids, then concept tokens fitted on the training split, then task tokens.

Order is deterministic: the 25 special tokens of ``grammar.SPECIAL_TOKENS`` (ids 0–24, ``[PAD]`` = 0,
``[UNK]`` = 1), then every concept token seen at least ``min_count`` times in training sequences, sorted by
kind (condition, procedure, medication, lab) and then by token text, then one ``[TASK:<name>]`` token per
task of the registry. A numeric lab code that passes the threshold brings all of its bin tokens, so a value
in a bin rarely seen in training is still known. Codes below the threshold map to ``[UNK]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from odyssey_batch.sequences.grammar import KIND_PREFIX, PREFIX_KIND, SPECIAL_TOKENS, UNK, TokenType, task_token

_KIND_RANK = {prefix: i for i, prefix in enumerate(KIND_PREFIX.values())}


def lab_token(code: str, bin_index: int | None) -> str:
    """``lab:LOINC:2160-0:q3`` for a value in bin 3, ``lab:LOINC:2160-0`` for a result without a number."""
    return f"lab:{code}" if bin_index is None else f"lab:{code}:q{bin_index}"


def concept_kind(token: str) -> TokenType | None:
    return PREFIX_KIND.get(token.split(":", 1)[0])


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]
    min_count: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(
        cls,
        counts: Counter[str],
        lab_bins: dict[str, int],
        tasks: Sequence[str],
        min_count: int = 5,
    ) -> Vocabulary:
        """``counts``: training-split occurrences of each concept token, numeric labs counted per code as
        ``lab:<code>:q*``; ``lab_bins``: the number of bins of each numeric lab code."""
        concepts = set()
        for token, count in counts.items():
            if count < min_count:
                continue
            if token.endswith(":q*"):
                code = token[len("lab:") : -len(":q*")]
                concepts.update(lab_token(code, i) for i in range(lab_bins.get(code, 1)))
            else:
                concepts.add(token)
        ordered = sorted(concepts, key=lambda t: (_KIND_RANK[t.split(":", 1)[0]], t))
        return cls((*SPECIAL_TOKENS, *ordered, *(task_token(t) for t in tasks)), min_count)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index  # type: ignore[attr-defined]

    def id(self, token: str) -> int:
        return self._index.get(token, 1)  # type: ignore[attr-defined]

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        index = self._index  # type: ignore[attr-defined]
        return np.fromiter((index.get(t, 1) for t in tokens), dtype=np.int32)

    @property
    def unk_id(self) -> int:
        return self._index[UNK]  # type: ignore[attr-defined]

    def as_dict(self) -> dict:
        return {"min_count": self.min_count, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(tuple(data["tokens"]), int(data["min_count"]))
