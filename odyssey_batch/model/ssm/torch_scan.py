"""Fast pure-PyTorch Mamba-1 selective scan (the ``torch`` backend; ``seq_fn`` of mamba-kernels.md §5.6).

A custom ``torch.autograd.Function`` takes the discretised inputs (Δ after bias and softplus, Δ·u, A, B, C) and
builds no autograd graph over time. Internally time comes first and the state is kept as (batch, N, D), so every
op runs along the long D axis; work is done in tiles of ``TILE`` steps, small enough to stay in cache.

* **forward** (gradients off) computes a tile's decays exp(Δ_t·A) and inputs (Δu)_t·B_t with one batched op each,
  runs the recurrence h_t = a_t·h_{t−1} + (Δu)_t·B_t as one in-place op per step, and writes y_t = C_t·h_t for
  the tile with one batched matmul into the preallocated output. It keeps the state every ``chunk`` steps
  (a checkpoint) and nothing else.
* **backward** walks the chunks last to first: it recomputes the chunk's decays and states from its checkpoint,
  then, tile by tile backwards, runs the adjoint recurrence g_t = C_t·dy_t + a_{t+1}·g_{t+1} (§4.3) as one in-place
  op per step and writes the tile's gradients of Δ, Δu, B and C into preallocated buffers with batched ops (dA is
  accumulated). The adjoint is seeded with the gradient of the returned last state, and its value before the
  first step is the gradient of the initial state.

Memory is O(batch·D·N·(L/chunk + chunk)) plus the saved (L, batch, D) and (L, batch, N) inputs. The wrapper
``selective_scan_torch`` adds the bias and softplus on Δ, the skip term D·u and the gate y·silu(z) with ordinary
autograd. It computes in float32 (float64 for float64 inputs) and returns y in u's dtype, so bf16 inputs work.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

CHUNK = 64
"""Steps between state checkpoints: the forward keeps L/CHUNK states, the backward recomputes CHUNK at a time."""

TILE = 16
"""Steps per batched op: small enough that a tile's (TILE, batch, N, D) buffers stay in cache."""


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The scan's working dtype: float32, or float64 when any of the given inputs is float64."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def check_scan_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> None:
    """Raise ValueError unless the arguments have the mamba_ssm layout of mamba-kernels.md §4.1."""
    if u.dim() != 3 or u.shape[-1] < 1:
        raise ValueError(f"u must be (batch, D, L) with L >= 1, got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) = ({dim}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    expected = {
        "delta": (delta, (batch, dim, length)),
        "B": (B, (batch, n, length)),
        "C": (C, (batch, n, length)),
        "D": (D, (dim,)),
        "z": (z, (batch, dim, length)),
        "delta_bias": (delta_bias, (dim,)),
        "initial_state": (initial_state, (batch, dim, n)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def _scan_tile(delta: Tensor, du: Tensor, A_t: Tensor, B: Tensor, decay: Tensor, states: Tensor) -> None:
    """Advance the state over one tile of n steps (time-major delta, du (n, b, D) and B (n, b, N)).

    States are (b, N, D), D innermost, and A_t is A transposed to (N, D). states[0] must hold the state before
    the tile; fills decay[:n] with a_t = exp(Δ_t·A) and states[1 : n + 1] with the tile's states h_t.
    """
    n = delta.shape[0]
    torch.mul(delta.unsqueeze(-2), A_t, out=decay[:n])
    decay[:n].exp_()
    torch.mul(du.unsqueeze(-2), B.unsqueeze(-1), out=states[1 : n + 1])
    a_rows, h_rows = decay.unbind(0), states.unbind(0)
    for i in range(n):
        h_rows[i + 1].addcmul_(a_rows[i], h_rows[i])


def _spans(start: int, end: int, step: int) -> list[tuple[int, int]]:
    """[start, end) cut into consecutive (first, last + 1) spans of at most ``step``."""
    return [(s, min(end, s + step)) for s in range(start, end, step)]


def _rows(x: Tensor) -> Tensor:
    """View a contiguous (n, b, ...) block as (n·b, ...) for batched matmuls."""
    return x.flatten(0, 1)


class SelectiveScanFn(torch.autograd.Function):
    """y_t = C_t·h_t with h_t = exp(Δ_t·A)·h_{t−1} + (Δu)_t·B_t, over discretised inputs of one float dtype.

    Inputs: delta, du (b, D, L); A (D, N); B, C (b, N, L); h0 (b, D, N) or None; chunk (int).
    Outputs: y (b, D, L) and the last state h_L (b, D, N), both differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, chunk: int
    ) -> tuple[Tensor, Tensor]:
        # autograd runs Function.forward with gradients disabled: everything below updates buffers in place.
        # Internally time comes first and the state is (b, N, D), so every batched op runs along D.
        batch, dim, length = delta.shape
        n_state = A.shape[1]
        delta_t, du_t = delta.permute(2, 0, 1).contiguous(), du.permute(2, 0, 1).contiguous()
        B_t, C_t = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()
        A_t = A.t().contiguous()
        width = min(TILE, length)
        checkpoints = delta.new_empty(math.ceil(length / chunk), batch, n_state, dim)
        decay = delta.new_empty(width, batch, n_state, dim)
        states = delta.new_empty(width + 1, batch, n_state, dim)
        y = delta.new_empty(length, batch, dim)
        if h0 is None:
            states[0].zero_()
        else:
            states[0].copy_(h0.transpose(1, 2))
        for k, (start, end) in enumerate(_spans(0, length, chunk)):
            checkpoints[k].copy_(states[0])
            for t0, t1 in _spans(start, end, TILE):
                n = t1 - t0
                _scan_tile(delta_t[t0:t1], du_t[t0:t1], A_t, B_t[t0:t1], decay, states)
                # y_t = C_t · h_t as one (1 × N) @ (N × D) product per (t, batch)
                torch.bmm(_rows(C_t[t0:t1]).unsqueeze(1), _rows(states[1 : n + 1]), out=_rows(y[t0:t1]).unsqueeze(1))
                states[0].copy_(states[n])
        ctx.save_for_backward(delta_t, du_t, A_t, B_t, C_t, checkpoints)
        ctx.chunk = chunk
        ctx.has_h0 = h0 is not None
        return y.permute(1, 2, 0), states[0].transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_last: Tensor) -> tuple[Tensor | None, ...]:
        delta_t, du_t, A_t, B_t, C_t, checkpoints = ctx.saved_tensors
        chunk = ctx.chunk
        length, batch, dim = delta_t.shape
        n_state = A_t.shape[0]
        width = min(chunk, length)
        decay = delta_t.new_empty(width, batch, n_state, dim)  # a_t for the block's steps
        states = delta_t.new_empty(width + 1, batch, n_state, dim)  # the block's h_{t-1} and h_t
        adjoint = delta_t.new_empty(min(TILE, length), batch, n_state, dim)  # g_t for one tile
        g_rows = adjoint.unbind(0)
        # autograd materialises an unused output's gradient as zeros, so both are tensors
        gy_t = grad_y.permute(2, 0, 1).contiguous()
        # carry: the adjoint flowing into a tile's last state from later steps, a_{t+1}·g_{t+1}
        carry = grad_last.transpose(1, 2).contiguous()
        d_delta, d_du = torch.empty_like(delta_t), torch.empty_like(du_t)
        d_B, d_C = torch.empty_like(B_t), torch.empty_like(C_t)
        d_A = torch.zeros_like(A_t)
        for k, (start, end) in reversed(list(enumerate(_spans(0, length, chunk)))):
            # recompute the block's decays and states from its checkpoint
            states[0].copy_(checkpoints[k])
            tiles = _spans(start, end, TILE)
            for t0, t1 in tiles:
                i0, i1 = t0 - start, t1 - start
                _scan_tile(delta_t[t0:t1], du_t[t0:t1], A_t, B_t[t0:t1], decay[i0:i1], states[i0 : i1 + 1])
            a_rows = decay.unbind(0)
            for t0, t1 in reversed(tiles):
                i0, i1, n = t0 - start, t1 - start, t1 - t0
                blk = slice(t0, t1)
                # adjoint recurrence g_t = C_t·dy_t + a_{t+1}·g_{t+1}, one in-place op per step
                g = adjoint[:n]
                torch.mul(gy_t[blk].unsqueeze(-2), C_t[blk].unsqueeze(-1), out=g)
                g_rows[n - 1].add_(carry)
                for i in range(n - 2, -1, -1):
                    g_rows[i].addcmul_(a_rows[i0 + i + 1], g_rows[i + 1])
                torch.mul(a_rows[i0], g_rows[0], out=carry)
                # dC_t = h_t·dy_t, d(Δu)_t = B_t·g_t, dB_t = g_t·(Δu)_t: one small product per (t, batch)
                h_tile = _rows(states[i0 + 1 : i1 + 1])
                torch.bmm(_rows(gy_t[blk]).unsqueeze(1), h_tile.transpose(1, 2), out=_rows(d_C[blk]).unsqueeze(1))
                torch.bmm(_rows(B_t[blk]).unsqueeze(1), _rows(g), out=_rows(d_du[blk]).unsqueeze(1))
                torch.bmm(_rows(du_t[blk]).unsqueeze(1), _rows(g).transpose(1, 2), out=_rows(d_B[blk]).unsqueeze(1))
                # s_t = g_t·a_t·h_{t−1}, the gradient of the exponent Δ_t·A (in the adjoint buffer, then a scratch)
                s = g.mul_(decay[i0:i1]).mul_(states[i0:i1])
                d_A.add_(torch.mul(s, delta_t[blk].unsqueeze(-2), out=decay[i0:i1]).sum(dim=(0, 1)))
                torch.sum(s.mul_(A_t), dim=-2, out=d_delta[blk])
        d_h0 = carry.transpose(1, 2) if ctx.has_h0 else None
        return (
            d_delta.permute(1, 2, 0),
            d_du.permute(1, 2, 0),
            d_A.t(),
            d_B.permute(1, 2, 0),
            d_C.permute(1, 2, 0),
            d_h0,
            None,
        )


def selective_scan_torch(
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
    *,
    chunk: int = CHUNK,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan (mamba-kernels.md §4.2) in pure PyTorch, trainable, on any device.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L); D, delta_bias: (D,); initial_state: (batch, D, N),
    the state before the first step (zeros if None), differentiable, so a long sequence can be scanned in pieces
    by passing one piece's last state to the next. Computes in float32 (float64 for float64 inputs). Returns y
    (batch, D, L) in u's dtype, or (y, last_state) with last_state (batch, D, N) in the working dtype; gradients
    flow into every tensor argument, including from the last state.
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype = compute_dtype(u, delta, B, C)
    u_c = u.to(dtype)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h0 = initial_state.to(dtype) if initial_state is not None else None
    y, last_state = SelectiveScanFn.apply(dt, dt * u_c, A.to(dtype), B.to(dtype), C.to(dtype), h0, chunk)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(u.dtype)
    return (y, last_state) if return_last_state else y


def selective_state_step(
    state: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None = None,
    z_t: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
) -> tuple[Tensor, Tensor]:
    """One token of the scan, for recurrent decoding; ``state`` is not modified.

    state: (batch, D, N); u_t, delta_t, z_t: (batch, D); A: (D, N); B_t, C_t: (batch, N); D, delta_bias: (D,).
    Returns y_t (batch, D) in u_t's dtype and the new state (batch, D, N) in state's dtype.
    """
    dtype = compute_dtype(u_t, delta_t, B_t, C_t)
    u_c = u_t.to(dtype)
    dt = delta_t.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(dtype))
    new_state = torch.addcmul((dt * u_c).unsqueeze(-1) * B_t.to(dtype).unsqueeze(-2), decay, state.to(dtype))
    y = torch.matmul(new_state, C_t.to(dtype).unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + D.to(dtype) * u_c
    if z_t is not None:
        y = y * F.silu(z_t.to(dtype))
    return y.to(u_t.dtype), new_state.to(state.dtype)
