"""EHRMamba model configuration and its presets.

``tiny`` is for tests (seconds on CPU), ``small`` trains on CPU on thousands of patients, ``paper`` is the
reference design's size (``ehrmamba-spec.md`` §9.2: d_model 768, 32 layers, d_state 16, expand 2, conv 4,
dt rank 48) for a GPU. No preset limits the sequence length: Mamba has no positional table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from odyssey_batch.sequences.grammar import TokenType


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 8
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int = 0  # 0: ceil(d_model / 16)
    time_embedding_size: int = 32
    type_vocab_size: int = len(TokenType)
    max_visit_orders: int = 512  # visit orders beyond this share the last row
    visit_segments: int = 3
    dropout: float = 0.1
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    dt_min: float = 1e-3
    dt_max: float = 0.1

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def time_step_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 32, "n_layers": 2, "d_state": 8, "time_embedding_size": 8, "dropout": 0.0},
    "small": {"d_model": 256, "n_layers": 8},
    "paper": {"d_model": 768, "n_layers": 32, "d_state": 16, "expand": 2, "d_conv": 4, "dt_rank": 48},
}


def preset(name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(ModelConfig(vocab_size=vocab_size, **PRESETS[name]), **overrides)
