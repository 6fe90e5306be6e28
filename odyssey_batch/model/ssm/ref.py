"""Plain sequential reference for the Mamba-1 selective scan (mamba_ssm layout), for tests and benchmarks only.

It always computes in **float64**, whatever the input dtype, so it can judge the float32 backends. Like mamba_ssm's
``selective_scan_ref`` it materialises exp(Δ·A) and Δ·u·B as (L, batch, D, N) tensors and walks the time axis of
one ``unbind()``; ordinary autograd differentiates it. That is simple and exact, and slow and memory-hungry at
training sizes: never use it in the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan by the definition, in float64.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L); D, delta_bias: (D,); initial_state: (batch, D, N).
    Returns y (batch, D, L) in u's dtype, or (y, last_state) with last_state (batch, D, N) in float32 (float64 when
    u, delta, B or C is float64), as the ``torch`` backend does.
    """
    f64 = torch.float64
    u64 = u.to(f64)
    dt = delta.to(f64)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f64)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(torch.einsum("bdl,dn->lbdn", dt, A.to(f64)))
    inputs = torch.einsum("bdl,bnl->lbdn", dt * u64, B.to(f64))
    h = u64.new_zeros(u.shape[0], *A.shape) if initial_state is None else initial_state.to(f64)
    ys = []
    for a_t, x_t, c_t in zip(decay.unbind(0), inputs.unbind(0), C.to(f64).unbind(-1), strict=True):
        h = a_t * h + x_t
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(f64)[:, None] * u64
    if z is not None:
        y = y * F.silu(z.to(f64))
    y = y.to(u.dtype)
    if not return_last_state:
        return y
    state_dtype = torch.float32
    for tensor in (u, delta, B, C):
        state_dtype = torch.promote_types(state_dtype, tensor.dtype)
    return y, h.to(state_dtype)
