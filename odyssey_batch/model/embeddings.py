"""EHRMamba's input embedding: a concept plus its five side streams, as in the reference design (§9.1).

    x = tanh(Linear([concept ‖ time-delta ‖ age]))      sinusoids with learnable frequencies and phases
    x = x + type + visit order + visit segment
    x = LayerNorm(Dropout(x))

Time deltas come from real token times (days), so special tokens make no artificial jumps; they enter as
log1p(days) so that an hour and a decade both land in a useful range of the sinusoid.
"""

from __future__ import annotations

import torch
from torch import nn

from odyssey_batch.model.config import ModelConfig


class TimeEmbedding(nn.Module):
    """sin(x · w + φ) with learnable w, φ ∈ R^size."""

    def __init__(self, size: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(1, size))
        self.phi = nn.Parameter(torch.empty(1, size))
        nn.init.xavier_uniform_(self.w)
        nn.init.xavier_uniform_(self.phi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x.unsqueeze(-1).float() * self.w + self.phi)


def time_deltas(times: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """log1p of the days since the previous token (0 for the first, or since ``previous`` when decoding)."""
    before = torch.cat([times[:, :1] if previous is None else previous[:, None], times[:, :-1]], dim=1)
    return torch.log1p((times - before).clamp(min=0.0))


class EHRMambaEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, t = config.d_model, config.time_embedding_size
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.time_embedding = TimeEmbedding(t)
        self.age_embedding = TimeEmbedding(t)
        self.scale = nn.Linear(d + 2 * t, d)
        self.type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.visit_order_embeddings = nn.Embedding(config.max_visit_orders, d)
        self.visit_segment_embeddings = nn.Embedding(config.visit_segments, d)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(
        self,
        token_ids: torch.Tensor,
        type_ids: torch.Tensor,
        ages: torch.Tensor,
        times: torch.Tensor,
        visit_orders: torch.Tensor,
        visit_segments: torch.Tensor,
        previous_time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All inputs (batch, L); ``times`` in days. Returns (batch, L, d_model)."""
        deltas = time_deltas(times.double(), previous_time).float()
        concept = self.word_embeddings(token_ids.long())
        x = torch.cat([concept, self.time_embedding(deltas).to(concept.dtype),
                       self.age_embedding(ages).to(concept.dtype)], dim=-1)  # fmt: skip
        x = torch.tanh(self.scale(x))
        orders = visit_orders.long().clamp(0, self.config.max_visit_orders - 1)
        x = x + self.type_embeddings(type_ids.long()) + self.visit_order_embeddings(orders)
        x = x + self.visit_segment_embeddings(visit_segments.long())
        return self.norm(self.dropout(x))
