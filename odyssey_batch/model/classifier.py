"""EHRMamba with a clinical-task head (multitask prompted finetuning).

Every input ends with a task token (``[TASK:<name>]``) after the patient's history cut at the prediction time;
one shared head reads the hidden state of that last token and gives one logit: P(outcome) = sigmoid(logit).
Because the prompt comes last, scoring all tasks of a patient is one pass over the history (``prefill``) and
then one recurrent step per task token (``score_tasks``).
"""

from __future__ import annotations

import torch
from torch import nn

from odyssey_batch.model.config import ModelConfig
from odyssey_batch.model.ehrmamba import EHRMamba, InferenceCache


class TaskHead(nn.Module):
    """Dropout → Linear → SiLU → Dropout → Linear(1), as the reference design's classification head."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(d_model, d_model), nn.SiLU(), nn.Dropout(dropout), nn.Linear(d_model, 1)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)


class EHRMambaForTasks(nn.Module):
    def __init__(self, backbone: EHRMamba):
        super().__init__()
        self.backbone = backbone
        self.head = TaskHead(backbone.config.d_model, backbone.config.dropout)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, streams: dict[str, torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """Logits (batch,) from each row's last real token (its task token)."""
        mask = torch.arange(streams["token_ids"].shape[1], device=lengths.device)[None, :] < lengths[:, None]
        hidden = self.backbone(streams, mask)
        return self.head(hidden[torch.arange(len(lengths), device=lengths.device), lengths - 1])

    def input_embeddings(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's input embeddings (batch, L, d_model) of right-padded streams."""
        return self.backbone._embed(streams)

    def logits_from_embeddings(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Logits (batch,) from given input embeddings, read at each row's last real token: with the embeddings
        of ``input_embeddings(streams)`` and the mask of ``lengths`` this is ``forward(streams, lengths)``."""
        hidden, _ = self.backbone.encode_embeddings(embeddings, mask)
        return self.head(hidden[torch.arange(len(lengths), device=lengths.device), lengths - 1])

    @torch.no_grad()
    def score_tasks(self, cache: InferenceCache, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of one task token per row of ``cache`` (a copy of the cache per task: ``cache.select``)."""
        return self.head(self.backbone.step(tokens, cache))
