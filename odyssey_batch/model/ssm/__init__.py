"""The selective-state-space (Mamba-1) layer's kernels behind one contract (mamba-kernels.md §7).

* ``selective_scan`` — the scan of §4.2 in the mamba_ssm layout; ``selective_state_step`` — one decoding step of
  it; ``causal_conv1d`` / ``causal_conv1d_step`` — the depthwise causal convolution in front of it.
* Backends: ``cuda`` (mamba_ssm and causal-conv1d kernels, ``ssm.cuda``), ``torch`` (the pure-PyTorch scan,
  ``ssm.torch_scan``) and ``reference`` (the float64 loop, ``ssm.ref``; tests only).
* Selection happens per call from the tensor's device, never at import: ``cuda`` when the tensor is on a CUDA
  device, its dtype is one the kernels take and the kernels import; otherwise ``torch``. The environment variable
  ``ODYSSEY_SSM_BACKEND`` (auto, cuda, torch, reference) or a ``backend=`` argument other than "auto" forces one;
  the argument wins over the variable. Forcing ``cuda`` for a CPU tensor is an error, not a silent fallback.
  For the step and convolution functions ``reference`` means ``torch``.
* The first use of each backend is logged once per process on the "odyssey_batch.model" logger.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from odyssey_batch.model.ssm import cuda
from odyssey_batch.model.ssm.ref import selective_scan_ref
from odyssey_batch.model.ssm.torch_scan import check_scan_shapes, compute_dtype, selective_scan_torch
from odyssey_batch.model.ssm.torch_scan import selective_state_step as _state_step_torch

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "backend_name",
    "causal_conv1d",
    "causal_conv1d_step",
    "selective_scan",
    "selective_state_step",
]

logger = logging.getLogger("odyssey_batch.model")

BACKEND_ENV = "ODYSSEY_SSM_BACKEND"
BACKENDS = ("auto", "cuda", "torch", "reference")
_ACTIVATIONS = (None, "silu", "swish")
_logged: set[str] = set()


def _requested(backend: str) -> str:
    """The backend asked for: the argument unless it is "auto", else the environment variable, else "auto"."""
    name = backend if backend != "auto" else (os.environ.get(BACKEND_ENV, "").strip().lower() or "auto")
    if name not in BACKENDS:
        source = "backend argument" if backend != "auto" else BACKEND_ENV
        raise ValueError(f"unknown SSM backend {name!r} from the {source}; expected one of {', '.join(BACKENDS)}")
    return name


def backend_name(device: torch.device | str, dtype: torch.dtype | None = None, *, backend: str = "auto") -> str:
    """The backend a call on tensors of this device (and input dtype, if given) uses: cuda, torch or reference.

    Raises RuntimeError when ``cuda`` is forced but the device is not CUDA or the kernels do not load.
    """
    name = _requested(backend)
    device = torch.device(device)
    if name == "auto":
        usable_dtype = dtype is None or dtype in cuda.KERNEL_DTYPES
        return "cuda" if device.type == "cuda" and usable_dtype and cuda.load() is not None else "torch"
    if name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"the cuda SSM backend was forced but the tensors are on {device}, not a CUDA device")
        if cuda.load() is None:
            raise RuntimeError(f"the cuda SSM backend was forced but is unavailable: {cuda.load_error()}")
    return name


def _choose(device: torch.device, dtype: torch.dtype | None, backend: str) -> str:
    name = backend_name(device, dtype, backend=backend)
    if name not in _logged:
        _logged.add(name)
        logger.info("SSM backend %r (first used for tensors on %s)", name, device)
    return name


def selective_scan(
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
    *,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """The Mamba-1 selective scan (mamba-kernels.md §4.2), in the mamba_ssm layout.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L); D, delta_bias: (D,). Returns y (batch, D, L) in
    u's dtype, or (y, last_state) with last_state (batch, D, N) in float32 (float64 for float64 inputs). On the
    ``cuda`` backend the last state is detached (mamba_ssm ignores its gradient); ``torch`` differentiates it.
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = _choose(u.device, compute_dtype(u, delta, B, C, z), backend)
    if name == "cuda":
        return cuda.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    scan = selective_scan_ref if name == "reference" else selective_scan_torch
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


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
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One step of the scan for decoding: state (batch, D, N); u_t, delta_t, z_t (batch, D); B_t, C_t (batch, N).

    Returns (y_t (batch, D) in u_t's dtype, the new state); ``state`` itself is left unchanged.
    """
    name = _choose(u_t.device, compute_dtype(u_t, delta_t, B_t, C_t), backend)
    step = cuda.selective_state_step if name == "cuda" else _state_step_torch
    return step(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus)


def _conv_weight(weight: Tensor, channels: int) -> Tensor:
    """The depthwise weight as (channels, width), from that shape or nn.Conv1d's (channels, 1, width)."""
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must be (channels, width) with channels = {channels}, got {tuple(weight.shape)}")
    return weight


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu", *, backend: str = "auto"
) -> Tensor:
    """Depthwise causal convolution over x (batch, channels, L), optionally followed by SiLU.

    weight: (channels, width) or (channels, 1, width); bias: (channels,). Output t sees inputs t − width + 1 … t
    (zeros before the start). Returns (batch, channels, L) in x's dtype.
    """
    _check_activation(activation)
    weight = _conv_weight(weight, x.shape[1])
    width = weight.shape[-1]
    name = _choose(x.device, x.dtype, backend)
    if name == "cuda" and width in cuda.CONV_WIDTHS:
        return cuda.causal_conv1d(x, weight, bias, activation)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    bias = bias.to(dtype) if bias is not None else None
    out = F.conv1d(F.pad(x.to(dtype), (width - 1, 0)), weight.to(dtype).unsqueeze(1), bias, groups=x.shape[1])
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def causal_conv1d_step(
    x_t: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One token of ``causal_conv1d`` for decoding, with HF's cache layout; ``conv_state`` is left unchanged.

    x_t: (batch, channels); conv_state: (batch, channels, state_len ≥ width − 1), the latest inputs, oldest
    first (HF and mamba_ssm keep state_len = width). Returns (y_t (batch, channels) in x_t's dtype, the new state
    with x_t shifted in).
    """
    _check_activation(activation)
    weight = _conv_weight(weight, x_t.shape[1])
    width = weight.shape[-1]
    name = _choose(x_t.device, x_t.dtype, backend)
    if name == "cuda" and width in cuda.CONV_WIDTHS:
        return cuda.causal_conv1d_step(x_t, conv_state, weight, bias, activation)
    window = torch.cat([conv_state, x_t.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    dtype = torch.promote_types(x_t.dtype, weight.dtype)
    y = (window[..., -width:].to(dtype) * weight.to(dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(dtype)
    if activation is not None:
        y = F.silu(y)
    return y.to(x_t.dtype), window[..., 1:]
