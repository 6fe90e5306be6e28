"""The selective-scan layer (odyssey_batch.model.ssm) against its float64 reference (mamba-kernels.md §8).

CPU tests always run, single-threaded and seeded. Tests marked ``gpu`` compare the CUDA paths with the reference
and are skipped without CUDA.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from odyssey_batch.model import ssm
from odyssey_batch.model.ssm import cuda, torch_scan
from odyssey_batch.model.ssm.ref import selective_scan_ref
from odyssey_batch.model.ssm.torch_scan import selective_scan_torch

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
PARAMS = ("A", "D", "delta_bias")
ACTIVATIONS = ("u", "delta", "B", "C", "z")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ssm.BACKEND_ENV, raising=False)


def make_inputs(
    length: int, regime: str = "init_dt", batch: int = 2, dim: int = 24, n: int = 16, seed: int = 0
) -> dict[str, Tensor]:
    """float64 scan inputs. "init_dt": Δ at mamba_ssm's initialisation (log-uniform in [1e-3, 0.1]);
    "big_dt": δ_bias = 3, so Δ ≈ 3 as in trained models. A is S4D-real, −[1 … n] with a little jitter."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if regime == "init_dt":
        lo, hi = math.log(1e-3), math.log(0.1)
        dt = torch.exp(torch.rand(dim, generator=g, dtype=torch.float64) * (hi - lo) + lo)
        delta_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    else:
        delta_bias = torch.full((dim,), 3.0, dtype=torch.float64)
    jitter = 1 + 0.1 * torch.rand(dim, 1, generator=g, dtype=torch.float64)
    return {
        "u": randn(batch, dim, length),
        "delta": 0.5 * randn(batch, dim, length),
        "A": -torch.arange(1, n + 1, dtype=torch.float64).repeat(dim, 1) * jitter,
        "B": randn(batch, n, length),
        "C": randn(batch, n, length),
        "D": randn(dim),
        "z": randn(batch, dim, length),
        "delta_bias": delta_bias,
    }


def leaves(
    inputs: dict[str, Tensor], dtype: torch.dtype, device: str = "cpu", param_dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Fresh leaf tensors; A, D and delta_bias in ``param_dtype`` when given (fp32 parameters, bf16 activations)."""
    return {
        name: t.detach().to(device, param_dtype if param_dtype and name in PARAMS else dtype).requires_grad_()
        for name, t in inputs.items()
    }


def run_scan(
    scan: Callable[..., tuple[Tensor, Tensor]],
    inputs: dict[str, Tensor],
    dtype: torch.dtype,
    device: str = "cpu",
    **kw: int,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """y, the last state and the gradients of a fixed random linear function of both."""
    args = leaves(inputs, dtype, device)
    y, last = scan(**args, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)
    gh = torch.randn(last.shape, generator=g, dtype=torch.float64).to(device)
    ((y.double() * gy).sum() + (last.double() * gh).sum()).backward()
    return y.cpu(), last.cpu(), {name: t.grad.cpu() for name, t in args.items()}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Max abs difference over max abs value (§8.3)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize(("chunk", "tile"), [(4, 2), (5, 16), (64, 16)])
def test_gradcheck_torch_scan(monkeypatch: pytest.MonkeyPatch, chunk: int, tile: int) -> None:
    monkeypatch.setattr(torch_scan, "TILE", tile)
    inputs = make_inputs(9, batch=1, dim=3, n=2, seed=3)
    inputs["initial_state"] = torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    names = list(inputs)
    args = [inputs[name].clone().requires_grad_() for name in names]

    def scan(*tensors: Tensor) -> tuple[Tensor, Tensor]:
        return selective_scan_torch(**dict(zip(names, tensors, strict=True)), return_last_state=True, chunk=chunk)

    assert torch.autograd.gradcheck(scan, args)


@pytest.mark.parametrize("regime", ["init_dt", "big_dt"])
@pytest.mark.parametrize(("length", "chunk"), [(1, 64), (7, 64), (64, 64), (300, 64), (300, 7), (300, 40)])
def test_torch_scan_float32_matches_reference(length: int, chunk: int, regime: str) -> None:
    inputs = make_inputs(length, regime)
    y, last, grads = run_scan(selective_scan_torch, inputs, torch.float32, chunk=chunk)
    y_ref, last_ref, grads_ref = run_scan(selective_scan_ref, inputs, torch.float64)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.double(), last_ref, rtol=1e-4, atol=1e-5)
    for name in GRAD_NAMES:
        assert grads[name].dtype == torch.float32
        assert rel_err(grads[name], grads_ref[name]) <= 1e-4, name


def test_torch_scan_float64_matches_reference_with_initial_state() -> None:
    inputs = make_inputs(300, "big_dt")
    inputs["initial_state"] = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y, last, grads = run_scan(selective_scan_torch, inputs, torch.float64, chunk=7)
    y_ref, last_ref, grads_ref = run_scan(selective_scan_ref, inputs, torch.float64)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=0, atol=1e-10)
    for name in (*GRAD_NAMES, "initial_state"):
        assert rel_err(grads[name], grads_ref[name]) <= 1e-10, name


def test_gradient_from_last_state_only() -> None:
    """Only the returned last state feeds the loss: y's gradient is zero and the adjoint is seeded by h_L."""
    inputs = make_inputs(100, "init_dt")
    grads = {}
    for scan in (selective_scan_torch, selective_scan_ref):
        args = leaves(inputs, torch.float64)
        _, last = scan(**args, return_last_state=True)
        (last * torch.linspace(-1, 1, last.numel(), dtype=torch.float64).view_as(last)).sum().backward()
        grads[scan] = {name: t.grad for name, t in args.items()}
    for name in ("u", "delta", "A", "B", "delta_bias"):
        assert rel_err(grads[selective_scan_torch][name], grads[selective_scan_ref][name]) <= 1e-10, name
    assert grads[selective_scan_torch]["C"].abs().max() == 0  # C only reaches y
    assert grads[selective_scan_torch]["D"] is None and grads[selective_scan_torch]["z"] is None


@pytest.mark.parametrize("split", [128, 150])
def test_scan_in_two_pieces_equals_one_pass(split: int) -> None:
    inputs = make_inputs(300, "big_dt", seed=7)
    full_y, full_last, full_grads = run_scan(selective_scan_torch, inputs, torch.float64)

    args = leaves(inputs, torch.float64)
    per_step = ("u", "delta", "B", "C", "z")
    first = {k: (v[..., :split] if k in per_step else v) for k, v in args.items()}
    second = {k: (v[..., split:] if k in per_step else v) for k, v in args.items()}
    y1, h1 = selective_scan_torch(**first, return_last_state=True)
    y2, h2 = selective_scan_torch(**second, return_last_state=True, initial_state=h1)
    y, last = torch.cat([y1, y2], dim=-1), h2
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(last.shape, generator=g, dtype=torch.float64)
    ((y * gy).sum() + (last * gh).sum()).backward()

    torch.testing.assert_close(y, full_y, rtol=0, atol=1e-10)
    torch.testing.assert_close(last, full_last, rtol=0, atol=1e-10)
    for name in GRAD_NAMES:
        assert rel_err(args[name].grad, full_grads[name]) <= 1e-10, name


def test_bfloat16_inputs_track_float32() -> None:
    """bf16 activations with fp32 parameters, as under autocast: the scan runs in fp32 on the same values."""
    inputs = make_inputs(150, "init_dt", seed=11)
    rounded = {k: (v.to(torch.bfloat16).double() if k in ACTIVATIONS else v) for k, v in inputs.items()}

    def bf16_scan(return_last_state: bool, **kw: Tensor) -> tuple[Tensor, Tensor]:
        cast = {k: (v.to(torch.bfloat16) if k in ACTIVATIONS else v) for k, v in kw.items()}
        return selective_scan_torch(**cast, return_last_state=return_last_state)

    y16, last16, grads16 = run_scan(bf16_scan, rounded, torch.float32)
    y32, last32, grads32 = run_scan(selective_scan_torch, rounded, torch.float32)
    assert y16.dtype == torch.bfloat16 and last16.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(last16, last32, rtol=1e-5, atol=1e-5)
    for name in GRAD_NAMES:
        assert rel_err(grads16[name], grads32[name]) <= 2e-2, name


def test_rejects_bad_shapes() -> None:
    inputs = make_inputs(5)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_torch(**{**inputs, "B": inputs["B"][:, :4]})
    with pytest.raises(ValueError, match="chunk"):
        selective_scan_torch(**inputs, chunk=0)


# ------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("prefill", [0, 40])
def test_prefill_then_step_decoding_matches_full_scan(prefill: int) -> None:
    inputs = {k: v.float() for k, v in make_inputs(64, "big_dt", seed=13).items()}
    y_full, last_full = ssm.selective_scan(**inputs, return_last_state=True)
    u, delta, B, C, z = (inputs[k] for k in ("u", "delta", "B", "C", "z"))
    params = {"A": inputs["A"], "D": inputs["D"], "delta_bias": inputs["delta_bias"]}
    if prefill:
        head = {k: v[..., :prefill] for k, v in inputs.items() if k in ("u", "delta", "B", "C", "z")}
        y_head, state = ssm.selective_scan(**head, **params, return_last_state=True)
        ys = list(y_head.unbind(-1))
    else:
        state, ys = torch.zeros_like(last_full), []
    for t in range(prefill, u.shape[-1]):
        before = state.clone()
        y_t, new_state = ssm.selective_state_step(
            state, u[..., t], delta[..., t], params["A"], B[..., t], C[..., t], params["D"], z_t=z[..., t],
            delta_bias=params["delta_bias"],
        )  # fmt: skip
        torch.testing.assert_close(state, before, rtol=0, atol=0)  # the input state is not modified
        state = new_state
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, dim=-1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last_full, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- causal conv1d


def conv_reference(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    """out[b, c, t] = bias[c] + Σ_k weight[c, k] · x[b, c, t − (width − 1) + k], zeros before the start."""
    width, length = weight.shape[-1], x.shape[-1]
    out = torch.zeros_like(x) if bias is None else bias[None, :, None].expand_as(x).clone()
    for t in range(length):
        for k in range(width):
            s = t - (width - 1) + k
            if s >= 0:
                out[..., t] += weight[:, k] * x[..., s]
    return F.silu(out) if activation else out


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("width", [2, 4])
def test_causal_conv1d_matches_reference(width: int, activation: str | None) -> None:
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 6, 11, generator=g)
    weight, bias = torch.randn(6, width, generator=g), torch.randn(6, generator=g)
    expected = conv_reference(x.double(), weight.double(), bias.double(), activation)
    out = ssm.causal_conv1d(x, weight, bias, activation=activation)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    # nn.Conv1d's (channels, 1, width) weight gives the same, and no bias works
    torch.testing.assert_close(ssm.causal_conv1d(x, weight[:, None, :], bias, activation=activation), out)
    no_bias = conv_reference(x.double(), weight.double(), None, activation)
    torch.testing.assert_close(ssm.causal_conv1d(x, weight, None, activation).double(), no_bias, rtol=1e-5, atol=1e-6)


def test_causal_conv1d_is_causal() -> None:
    g = torch.Generator().manual_seed(19)
    x = torch.randn(1, 4, 20, generator=g)
    weight, bias = torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    out = ssm.causal_conv1d(x, weight, bias)
    changed = x.clone()
    changed[..., 12:] += 5.0
    out_changed = ssm.causal_conv1d(changed, weight, bias)
    torch.testing.assert_close(out_changed[..., :12], out[..., :12], rtol=0, atol=0)
    assert (out_changed[..., 12:] - out[..., 12:]).abs().amax(dim=1).min() > 0


def test_causal_conv1d_step_matches_full_conv() -> None:
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, 6, 9, generator=g)
    weight, bias = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    full = ssm.causal_conv1d(x, weight, bias)
    state = torch.zeros(2, 6, 4)
    for t in range(x.shape[-1]):
        y_t, state = ssm.causal_conv1d_step(x[..., t], state, weight, bias)
        torch.testing.assert_close(y_t, full[..., t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, x[..., -4:])


def test_causal_conv1d_keeps_dtype_and_rejects_bad_arguments() -> None:
    x = torch.randn(1, 3, 5, dtype=torch.bfloat16)
    assert ssm.causal_conv1d(x, torch.randn(3, 4), torch.randn(3)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="activation"):
        ssm.causal_conv1d(x, torch.randn(3, 4), activation="relu")
    with pytest.raises(ValueError, match="weight"):
        ssm.causal_conv1d(x, torch.randn(2, 4))


# ------------------------------------------------------------------------------------------ backend selection


class _FakeKernels:
    """Stands in for loaded CUDA kernels; any use fails the test."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"CPU tensors reached the cuda kernel {name}")


def test_cpu_tensors_never_go_to_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "load", lambda: _FakeKernels())
    assert ssm.backend_name(torch.device("cpu")) == "torch"
    assert ssm.backend_name("cuda") == "cuda"  # a CUDA device would, with the kernels loaded
    assert ssm.backend_name("cuda", torch.float64) == "torch"  # the kernels take no float64
    inputs = {k: v.float() for k, v in make_inputs(5).items()}
    ssm.selective_scan(**inputs)
    ssm.causal_conv1d(inputs["u"], torch.randn(24, 4))


def test_without_kernels_cuda_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "load", lambda: None)
    assert ssm.backend_name("cuda") == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_kernels_fail_to_load_quietly_without_cuda() -> None:
    assert cuda.load() is None
    assert cuda.load() is None  # the cached verdict
    assert cuda.load_error()


def test_environment_forces_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ssm.BACKEND_ENV, "reference")
    assert ssm.backend_name("cpu") == "reference"
    inputs = {k: v.float() for k, v in make_inputs(20).items()}
    y, last = ssm.selective_scan(**inputs, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**inputs, return_last_state=True)
    assert torch.equal(y, y_ref) and torch.equal(last, last_ref)
    y_torch = ssm.selective_scan(**inputs, backend="torch")  # an explicit argument beats the environment
    assert torch.equal(y_torch, selective_scan_torch(**inputs))


def test_environment_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "load", lambda: _FakeKernels())
    monkeypatch.setenv(ssm.BACKEND_ENV, "torch")
    assert ssm.backend_name("cuda") == "torch"
    inputs = {k: v.float() for k, v in make_inputs(20).items()}
    assert torch.equal(ssm.selective_scan(**inputs), selective_scan_torch(**inputs))


def test_forcing_cuda_on_cpu_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = {k: v.float() for k, v in make_inputs(5).items()}
    with pytest.raises(RuntimeError, match="forced"):
        ssm.selective_scan(**inputs, backend="cuda")
    monkeypatch.setenv(ssm.BACKEND_ENV, "cuda")
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        ssm.selective_scan(**inputs)
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        ssm.causal_conv1d(inputs["u"], torch.randn(24, 4))


def test_unknown_backend_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ssm.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match=ssm.BACKEND_ENV):
        ssm.backend_name("cpu")
    monkeypatch.delenv(ssm.BACKEND_ENV)
    with pytest.raises(ValueError, match="backend argument"):
        ssm.backend_name("cpu", backend="fast")


def test_backend_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ssm, "_logged", set())
    inputs = {k: v.float() for k, v in make_inputs(5).items()}
    with caplog.at_level(logging.INFO, logger="odyssey_batch.model"):
        for _ in range(3):
            ssm.selective_scan(**inputs)
    messages = [r.getMessage() for r in caplog.records if r.name == "odyssey_batch.model"]
    assert len(messages) == 1 and "'torch'" in messages[0]


# ---------------------------------------------------------------------------------------------------- GPU


def _require_kernels() -> None:
    if cuda.load() is None:
        pytest.skip(f"mamba_ssm / causal_conv1d not usable: {cuda.load_error()}")


def _y_and_grads(
    scan: Callable[..., Tensor], args: dict[str, Tensor], backend: str | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    y = scan(**args) if backend is None else scan(**args, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y.double() * gy.to(y.device)).sum().backward()
    return y, {name: t.grad for name, t in args.items()}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("regime", ["init_dt", "big_dt"])
def test_gpu_torch_backend_matches_reference(regime: str) -> None:
    inputs = make_inputs(300, regime)
    y, last, grads = run_scan(selective_scan_torch, inputs, torch.float32, device="cuda")
    y_ref, last_ref, grads_ref = run_scan(selective_scan_ref, inputs, torch.float64)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.double(), last_ref, rtol=1e-4, atol=1e-5)
    for name in GRAD_NAMES:
        assert rel_err(grads[name], grads_ref[name]) <= 1e-4, name


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("regime", ["init_dt", "big_dt"])
@pytest.mark.parametrize("length", [1, 64, 300])
def test_gpu_cuda_backend_float32_matches_reference(length: int, regime: str) -> None:
    _require_kernels()
    inputs = make_inputs(length, regime)
    y, grads = _y_and_grads(ssm.selective_scan, leaves(inputs, torch.float32, "cuda"), backend="cuda")
    y_ref, grads_ref = _y_and_grads(selective_scan_ref, leaves(inputs, torch.float64))
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-3, atol=1e-4)
    for name in GRAD_NAMES:
        assert rel_err(grads[name], grads_ref[name]) <= 1e-3, name
    _, last = ssm.selective_scan(**leaves(inputs, torch.float32, "cuda"), return_last_state=True, backend="cuda")
    _, last_ref = selective_scan_ref(**inputs, return_last_state=True)
    assert not last.requires_grad  # mamba_ssm ignores the last state's gradient, so it comes back detached
    torch.testing.assert_close(last.double().cpu(), last_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_backend_bfloat16_matches_reference() -> None:
    _require_kernels()
    inputs = make_inputs(300, "init_dt")
    args = leaves(inputs, torch.bfloat16, "cuda", param_dtype=torch.float32)
    ref_args = leaves({k: v.detach().cpu() for k, v in args.items()}, torch.float64)
    y, grads = _y_and_grads(ssm.selective_scan, args, backend="cuda")
    y_ref, grads_ref = _y_and_grads(selective_scan_ref, ref_args)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=3e-2, atol=3e-2)
    for name in GRAD_NAMES:
        grad, grad_ref = grads[name].double().cpu().flatten(), grads_ref[name].flatten()
        assert F.cosine_similarity(grad, grad_ref, dim=0) > 0.999, name
        assert rel_err(grad, grad_ref) <= 5e-2, name


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_decode_and_conv_match_torch() -> None:
    _require_kernels()
    inputs = {k: v.to("cuda", torch.float32) for k, v in make_inputs(8, "big_dt").items()}
    state = torch.randn(2, 24, 16, device="cuda")
    step_args = (inputs["u"][..., 0], inputs["delta"][..., 0], inputs["A"], inputs["B"][..., 0], inputs["C"][..., 0])
    extra = {"D": inputs["D"], "z_t": inputs["z"][..., 0], "delta_bias": inputs["delta_bias"]}
    y_cuda, s_cuda = ssm.selective_state_step(state, *step_args, **extra, backend="cuda")
    y_torch, s_torch = ssm.selective_state_step(state, *step_args, **extra, backend="torch")
    torch.testing.assert_close(y_cuda, y_torch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_cuda, s_torch, rtol=1e-4, atol=1e-4)

    x, weight, bias = inputs["u"], torch.randn(24, 4, device="cuda"), torch.randn(24, device="cuda")
    out_cuda = ssm.causal_conv1d(x, weight, bias, backend="cuda")
    torch.testing.assert_close(out_cuda, ssm.causal_conv1d(x, weight, bias, backend="torch"), rtol=1e-4, atol=1e-4)
    conv_state = torch.randn(2, 24, 4, device="cuda")
    y_c, st_c = ssm.causal_conv1d_step(x[..., 0], conv_state, weight, bias, backend="cuda")
    y_t, st_t = ssm.causal_conv1d_step(x[..., 0], conv_state, weight, bias, backend="torch")
    torch.testing.assert_close(y_c, y_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st_c, st_t)
