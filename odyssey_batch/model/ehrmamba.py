"""EHRMamba: the embedding of a patient's token streams, a stack of Mamba blocks, and a next-token head tied
to the concept embedding (on purpose: the reference design's head was untied by accident, ~16 M unused
parameters).

    h = embeddings(tokens, types, ages, times, visit orders, segments)
    for each block:  h = h + mixer(RMSNorm(h))          (residual kept in float32)
    h = RMSNorm(h);  logits = h · Eᵀ

``forward`` encodes whole (right-padded) sequences; ``prefill`` also returns the recurrent state after each
row's last real token, and ``step`` advances every row by one token from that state, so encoding a history
once and then appending a task token costs one step (multitask scoring) and generation costs O(1) per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from odyssey_batch.model.config import ModelConfig
from odyssey_batch.model.embeddings import EHRMambaEmbeddings
from odyssey_batch.model.mixer import MambaMixer
from odyssey_batch.sequences.tokens import STREAMS


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class MambaBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mixer = MambaMixer(config)


@dataclass
class InferenceCache:
    """Per layer, the conv state (batch, d_inner, d_conv) and SSM state (batch, d_inner, d_state), plus the
    time of each row's last token (for the next time delta)."""

    conv: list[torch.Tensor]
    ssm: list[torch.Tensor]
    last_time: torch.Tensor

    def select(self, rows: torch.Tensor) -> InferenceCache:
        """The cache of some rows (or the same row several times: one copy per task)."""
        return InferenceCache([c[rows] for c in self.conv], [s[rows] for s in self.ssm], self.last_time[rows])


class EHRMamba(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = EHRMambaEmbeddings(config)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.apply(self._init_weights)
        with torch.no_grad():  # each block adds to the residual stream: scale its output (GPT-2, mamba_ssm)
            for layer in self.layers:
                layer.mixer.out_proj.weight /= (2 * config.n_layers) ** 0.5

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights and zero biases, except the SSM parameters the mixer set."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and not getattr(module.weight, "_no_reinit", False):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, streams: dict[str, torch.Tensor], previous_time: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(*(streams[name] for name in STREAMS), previous_time=previous_time)

    def forward(self, streams: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Streams of shape (batch, L), right-padded; returns the final hidden states (batch, L, d_model)."""
        hidden, _ = self._encode(streams, mask, None)
        return hidden

    def prefill(self, streams: dict[str, torch.Tensor], lengths: torch.Tensor) -> tuple[torch.Tensor, InferenceCache]:
        """Encode histories; returns each row's hidden state at its last real token and the recurrent cache."""
        mask = torch.arange(streams["token_ids"].shape[1], device=lengths.device)[None, :] < lengths[:, None]
        hidden, states = self._encode(streams, mask, lengths)
        rows = torch.arange(len(lengths), device=lengths.device)
        last = hidden[rows, lengths - 1]
        times = streams["times"].double()[rows, lengths - 1]
        return last, InferenceCache([c for c, _ in states], [s for _, s in states], times)

    def _encode(self, streams, mask, lengths) -> tuple[torch.Tensor, list]:
        return self.encode_embeddings(self._embed(streams), mask, lengths)

    def encode_embeddings(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list]:
        """The blocks and final norm from given input embeddings (batch, L, d_model), as ``_embed`` makes them;
        returns the final hidden states and, with ``lengths``, each layer's decoding state. Starting here lets
        attribution methods (integrated gradients) differentiate with respect to the input embeddings."""
        residual = embeddings.float()
        states = []
        for layer in self.layers:
            out, state = layer.mixer(layer.norm(residual), mask, lengths)
            residual = residual + out.float()
            states.append(state)
        return self.norm_f(residual), states

    def step(self, token: dict[str, torch.Tensor], cache: InferenceCache) -> torch.Tensor:
        """Advance every row by one token (streams of shape (batch,)); updates ``cache``; returns (batch, d)."""
        streams = {name: token[name][:, None] for name in STREAMS}
        residual = self._embed(streams, previous_time=cache.last_time).float()[:, 0]
        for i, layer in enumerate(self.layers):
            out, cache.conv[i], cache.ssm[i] = layer.mixer.step(layer.norm(residual), cache.conv[i], cache.ssm[i])
            residual = residual + out.float()
        cache.last_time = token["times"].double()
        return self.norm_f(residual)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits through the concept embedding (tied head)."""
        return hidden.to(self.embeddings.word_embeddings.weight.dtype) @ self.embeddings.word_embeddings.weight.T
