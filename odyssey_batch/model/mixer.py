"""The Mamba (selective SSM) mixer, with mamba_ssm / Hugging Face parameter names and initialisation.

    x, z   = in_proj(h)                    d_model → 2·d_inner
    x      = silu(causal depthwise conv(x))
    Δ, B, C = x_proj(x)                    Δ through dt_proj and softplus
    y      = selective_scan(x, Δ, A, B, C, D) · silu(z)
    out    = out_proj(y)

Padding (right padding, the EHRMamba layout) gets Δ = 0: the state neither decays nor takes input there, so
the state after a padded row is the state after its last real token, and padding never reaches real tokens.
The scan itself runs on the backend ``model.ssm`` picks (mamba_ssm kernels on CUDA, a fast PyTorch scan
elsewhere). ``step`` advances one token from a cached conv and SSM state, for O(1) decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from odyssey_batch.model.config import ModelConfig
from odyssey_batch.model.ssm import causal_conv1d, causal_conv1d_step, selective_scan, selective_state_step


class MambaMixer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.time_step_rank, config.d_conv
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = di, n, r, k
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, kernel_size=k, groups=di, padding=k - 1, bias=True)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)
        self.reset_ssm_parameters(config)

    @torch.no_grad()
    def reset_ssm_parameters(self, config: ModelConfig) -> None:
        """S4D-real A, D = 1, dt log-uniform in [dt_min, dt_max] through the inverse softplus (as mamba_ssm)."""
        n = self.d_state
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
        ).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.weight._no_reinit = True  # type: ignore[attr-defined]
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True  # type: ignore[attr-defined]
            p._no_reinit = True  # type: ignore[attr-defined]

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, L, d_inner) → Δ (batch, d_inner, L) after softplus, B and C (batch, d_state, L)."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float())
        return delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """hidden (batch, L, d_model); mask (batch, L), 1 for real tokens. With ``lengths`` (real tokens per
        row) also returns the decoding state after each row's last real token: (conv state, SSM state)."""
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, L) each
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        conv_input = x
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        delta, B, C = self._ssm_inputs(x.transpose(1, 2))
        if mask is not None:
            delta = delta * mask[:, None, :].to(delta.dtype)
        A = -torch.exp(self.A_log.float())
        y, last_state = selective_scan(
            x, delta, A, B, C, self.D.float(), z=z, delta_softplus=False, return_last_state=True
        )
        out = self.out_proj(y.transpose(1, 2).to(hidden.dtype))
        if lengths is None:
            return out, None
        # the conv state: the last d_conv inputs before each row's end (zeros before the start)
        padded = F.pad(conv_input, (self.d_conv, 0))
        index = lengths[:, None] + torch.arange(self.d_conv, device=lengths.device)[None, :]
        conv_state = padded.gather(2, index[:, None, :].expand(-1, self.d_inner, -1))
        return out, (conv_state.float(), last_state.float())

    def step(
        self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token: hidden (batch, d_model) → (out (batch, d_model), new conv state, new SSM state)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, d_inner)
        x, conv_state = causal_conv1d_step(x, conv_state, self.conv1d.weight, self.conv1d.bias, activation="silu")
        delta, B, C = self._ssm_inputs(x[:, None, :].to(hidden.dtype))
        A = -torch.exp(self.A_log.float())
        y, ssm_state = selective_state_step(
            ssm_state, x, delta[..., 0], A, B[..., 0], C[..., 0], self.D.float(), z_t=z, delta_softplus=False
        )
        return self.out_proj(y.to(hidden.dtype)), conv_state, ssm_state
