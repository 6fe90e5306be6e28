"""The ``cuda`` backend: mamba_ssm's and causal-conv1d's CUDA kernels, imported lazily.

Nothing here imports mamba_ssm or causal_conv1d at module import. ``load()`` tries once per process and caches
the answer: the kernels, or None when CUDA is unavailable or either package fails to import. It catches every
Exception, not only ImportError, because a missing compiled extension or a CUDA initialisation failure surfaces
as other errors (mamba-kernels.md §2.9, §7.4). The wrappers below adapt the kernels to this package's contract:

* dtypes: the scan kernel wants u, delta, z, B and C in one float dtype (float32, float16 or bfloat16; the widest
  of those given is used) and A, D and delta_bias in float32; the conv kernels want the bias in the weight's dtype;
* ``selective_scan_fn`` ignores the gradient of the last state it returns, so the last state is returned
  detached: gradients that need it must use the ``torch`` backend;
* the kernels update decoding states in place, the contract returns new states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger("odyssey_batch.model")

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the CUDA kernels accept."""

CONV_WIDTHS = range(2, 5)
"""Kernel widths causal-conv1d supports."""


@dataclass(frozen=True)
class CudaKernels:
    """The kernel entry points, as imported from mamba_ssm and causal_conv1d."""

    selective_scan_fn: Callable[..., Tensor | tuple[Tensor, Tensor]]
    selective_state_update: Callable[..., Tensor]
    causal_conv1d_fn: Callable[..., Tensor]
    causal_conv1d_update: Callable[..., Tensor]


_kernels: CudaKernels | None = None
_error: str | None = None
_tried = False


def load() -> CudaKernels | None:
    """The CUDA kernels, or None when they cannot be used in this process (the verdict is cached)."""
    global _kernels, _error, _tried
    if not _tried:
        _tried = True
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False")
            from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update

            _kernels = CudaKernels(selective_scan_fn, selective_state_update, causal_conv1d_fn, causal_conv1d_update)
        except Exception as exc:  # a broken extension raises ImportError, OSError or RuntimeError alike
            _error = f"{type(exc).__name__}: {exc}"
            logger.debug("CUDA SSM kernels unavailable: %s", _error)
    return _kernels


def load_error() -> str | None:
    """Why ``load()`` returned None (None when it succeeded or was not tried yet)."""
    return _error


def _require() -> CudaKernels:
    kernels = load()
    if kernels is None:
        raise RuntimeError(f"the cuda SSM backend is unavailable ({_error}); install mamba-ssm and causal-conv1d")
    return kernels


def _input_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The one dtype the kernels get for u, delta, z, B and C: the widest of those given."""
    dtype = next(t.dtype for t in tensors if t is not None)
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"the cuda SSM backend supports float32, float16 and bfloat16, got {dtype}")
    return dtype


def _f32(x: Tensor | None) -> Tensor | None:
    return x.float() if x is not None else None


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
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm ``selective_scan_fn`` under the package contract; y in u's dtype, the last state detached."""
    kernels = _require()
    dtype = _input_dtype(u, delta, B, C, z)
    out = kernels.selective_scan_fn(
        u.to(dtype),
        delta.to(dtype),
        A.float(),
        B.to(dtype),
        C.to(dtype),
        D=_f32(D),
        z=z.to(dtype) if z is not None else None,
        delta_bias=_f32(delta_bias),
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )
    if not return_last_state:
        return out.to(u.dtype)
    y, last_state = out
    return y.to(u.dtype), last_state.detach()


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
    """mamba_ssm's Triton ``selective_state_update`` on a copy of ``state``: (y_t in u_t's dtype, new state)."""
    kernels = _require()
    new_state = state.clone()
    y = kernels.selective_state_update(
        new_state,
        u_t,
        delta_t,
        A.float(),
        B_t,
        C_t,
        D=_f32(D),
        z=z_t,
        dt_bias=_f32(delta_bias),
        dt_softplus=delta_softplus,
    )
    return y.to(u_t.dtype), new_state


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu") -> Tensor:
    """causal-conv1d's ``causal_conv1d_fn``: x (batch, channels, L), weight (channels, width), width 2–4."""
    kernels = _require()
    _input_dtype(x)
    if x.stride(-1) != 1:  # the kernel also takes channel-last x, but only with channels divisible by 8
        x = x.contiguous()
    bias = bias.to(weight.dtype) if bias is not None else None
    return kernels.causal_conv1d_fn(x, weight, bias, activation=activation)


def causal_conv1d_step(
    x_t: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu"
) -> tuple[Tensor, Tensor]:
    """causal-conv1d's ``causal_conv1d_update`` on a copy of ``conv_state`` (batch, channels, width).

    Returns (y_t (batch, channels) in x_t's dtype, the new conv state in x_t's dtype, as the kernel requires).
    """
    kernels = _require()
    _input_dtype(x_t)
    new_state = conv_state.to(x_t.dtype, copy=True)
    bias = bias.to(weight.dtype) if bias is not None else None
    y = kernels.causal_conv1d_update(x_t, new_state, weight, bias, activation=activation)
    return y, new_state
