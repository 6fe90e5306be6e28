"""One Mamba-1 layer against the reference scan, Hugging Face's slow path and a causal SDPA Transformer layer, on CPU.

    python -m benchmarks.ssm [--threads 1] [--repeats 3] [--lengths 512,2048,8192] [--skip-slow]

Batch 8, d_model 256, d_state 16, expand 2, one layer, float32. Each figure is forward + backward (the gradient of
the input and of every parameter), the median of ``--repeats`` calls after one warm-up call, with
``torch.set_num_threads(--threads)`` (default 1, as mamba-kernels.md §5.1). Cells:

* ``ours``: RMSNorm → ``odyssey_batch.model.mixer.MambaMixer`` → residual (an EHRMamba ``MambaBlock``), with the
  SSM backend forced to ``torch`` (the pure-PyTorch scan);
* ``reference``: the same layer with the backend forced to ``reference`` (the plain sequential float64 scan);
* ``hf``: transformers' ``MambaModel`` with one layer, fed ``inputs_embeds``, on its pure-PyTorch slow path
  (mamba_ssm and causal_conv1d are hidden from it; needs ``transformers``, else the cell is null with the reason);
* ``transformer``: a pre-LayerNorm causal Transformer layer, 4 heads, FFN 4×, ``F.scaled_dot_product_attention``.

``reference`` and ``hf`` run only at lengths up to 512 (``--skip-slow`` drops them; HF's slow path takes minutes
per call there, mamba-kernels.md §3.3); ``ours`` and ``transformer`` run at every length. Every cell runs in a fresh
process (this script with ``--cell``), so cells don't share a memory high-water mark: its peak memory is the
process's peak RSS (``ru_maxrss``, reset after the warm-up) over the timed calls minus the RSS before them.
With a CUDA device (and not ``--no-gpu``) it also times ``ours`` on the GPU at ``--gpu-lengths`` with the
mamba_ssm kernels (backend ``cuda``) and with our PyTorch scan (backend ``torch``), peak memory from
``torch.cuda.max_memory_allocated``, under the "gpu" key. Progress goes to stderr; the last line printed on stdout
is one JSON object.
"""

# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# ``python benchmarks/ssm.py`` would put this folder first on sys.path, where benchmarks/tokenize.py shadows the
# standard library's ``tokenize``: take the folder off before importing more.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import argparse
import contextlib
import ctypes
import gc
import json
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BATCH, D_MODEL, D_STATE, EXPAND, D_CONV, HEADS = 8, 256, 16, 2, 4, 4
CELLS = ("ours", "reference", "hf", "transformer")
SLOW = ("reference", "hf")
SLOW_MAX_LENGTH = 512  # reference and hf run only up to here
CELL_BACKEND = {"ours": "torch", "reference": "reference"}


class MambaLayer(nn.Module):
    """h + mixer(RMSNorm(h)): one EHRMamba block, as ``EHRMamba._encode`` runs it (residual in float32)."""

    def __init__(self) -> None:
        super().__init__()
        from odyssey_batch.model.config import ModelConfig
        from odyssey_batch.model.ehrmamba import MambaBlock

        config = ModelConfig(vocab_size=1, d_model=D_MODEL, n_layers=1, d_state=D_STATE, expand=EXPAND, d_conv=D_CONV)
        self.block = MambaBlock(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out, _ = self.block.mixer(self.block.norm(hidden))
        return hidden.float() + out.float()


class CausalTransformerLayer(nn.Module):
    """Pre-LayerNorm causal self-attention (SDPA, is_causal) and a GELU FFN of 4× the width, each with a residual."""

    def __init__(self, d: int = D_MODEL, heads: int = HEADS, ffn: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, ffn * d), nn.Linear(ffn * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, length, d))
        return x + self.ff2(F.gelu(self.ff1(self.norm2(x))))


def _hf_layer() -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """transformers' one-layer MambaModel on its pure-PyTorch path, and how to call it on embeddings."""
    # transformers binds its kernels when modeling_mamba is imported and sends CPU tensors to mamba_ssm's CUDA
    # kernels whenever that imports (mamba-kernels.md §3.1): hide the packages so this process takes the slow path.
    for package in ("mamba_ssm", "causal_conv1d"):
        sys.modules.setdefault(package, None)  # type: ignore[arg-type]
    import transformers
    from transformers import MambaConfig, MambaModel

    config = MambaConfig(
        hidden_size=D_MODEL,
        state_size=D_STATE,
        expand=EXPAND,
        num_hidden_layers=1,
        conv_kernel=D_CONV,
        vocab_size=16,  # the embedding table is not used (inputs_embeds) and not counted
        use_cache=False,
    )
    model = MambaModel(config)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=x, use_cache=False).last_hidden_state

    params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embeddings"))
    return model, forward, {"transformers": transformers.__version__, "params": params}


def _rss_mb() -> float:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process's peak resident set size (since the last reset; Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the RSS before the timed calls is not inflated
    by what the warm-up freed (glibc keeps freed memory otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_cell(name: str, length: int, repeats: int, device: str, backend: str | None) -> dict[str, Any]:
    """Time forward + backward of one layer in this process; the figures of one cell."""
    if backend is not None:
        from odyssey_batch.model.ssm import BACKEND_ENV

        os.environ[BACKEND_ENV] = backend  # read per scan call by the mixer's selective_scan
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    info: dict[str, Any] = {}
    if name in ("ours", "reference"):
        from odyssey_batch.model.ssm import backend_name

        layer: nn.Module = MambaLayer()
        forward: Callable[[torch.Tensor], torch.Tensor] = layer
        info["backend"] = backend_name(dev, torch.float32)
    elif name == "hf":
        layer, forward, info = _hf_layer()
    elif name == "transformer":
        layer = CausalTransformerLayer()
        forward = layer
    else:
        raise ValueError(f"unknown cell {name!r}: choose one of {', '.join(CELLS)}")
    info.setdefault("params", sum(p.numel() for p in layer.parameters()))
    layer.to(dev).train()
    x = torch.randn(BATCH, length, D_MODEL, device=dev, requires_grad=True)
    grad = torch.randn(BATCH, length, D_MODEL, device=dev)

    def call() -> tuple[float, float]:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if cuda:
            torch.cuda.synchronize(dev)
        wall, cpu = time.perf_counter(), time.process_time()
        forward(x).backward(grad)
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - wall, time.process_time() - cpu

    rss_before_warmup = _rss_mb()
    first, _ = call()
    print(f"  {name} L={length}: warm-up {first:.3f} s", file=sys.stderr, flush=True)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    _release_freed_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base = _rss_mb() if _reset_peak_rss() else rss_before_warmup  # without a reset the warm-up counts too
    walls, cpus = [], []
    for repeat in range(1, repeats + 1):
        wall, cpu = call()
        walls.append(wall)
        cpus.append(cpu)
        print(f"  {name} L={length}: repeat {repeat}: {wall:.3f} s ({cpu:.3f} CPU-s)", file=sys.stderr, flush=True)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _peak_rss_mb()
    seconds = statistics.median(walls)
    return {
        "cell": name,
        "length": length,
        "device": str(dev),
        "seconds": round(seconds, 4),
        "cpu_seconds": round(statistics.median(cpus), 4),
        "all_seconds": [round(s, 4) for s in walls],
        "first_call_s": round(first, 4),
        "peak_mb": round(peak - base, 1),
        "memory": "cuda max_memory_allocated delta" if cuda else "peak RSS delta",
        "tokens_per_s": round(BATCH * length / seconds, 1),
        "threads": torch.get_num_threads(),
        **info,
    }


def measure(
    name: str, length: int, args: argparse.Namespace, device: str = "cpu", backend: str | None = None
) -> dict[str, Any]:
    """Run one cell in a fresh process; its JSON, or {"error": why} when it did not finish."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "benchmarks.ssm", "--cell", name, "--length", str(length)]
    command += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--device", device]
    if backend is not None:
        command += ["--backend", backend]
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, timeout=args.cell_timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.cell_timeout} s"}
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        return {"error": f"exit status {done.returncode}, no JSON result" + (f": {lines[-1][:200]}" if lines else "")}
    if done.returncode != 0 and "error" not in result:
        result = {"error": f"exit status {done.returncode}"}
    return result


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def _fmt(value: float | None, unit: str) -> str:
    return "—" if value is None else f"{value:.3f} {unit}" if unit == "s" else f"{value:.0f} {unit}"


def _hf_missing() -> str | None:
    """Why the hf cell cannot run here (transformers missing), else None."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return 'transformers is not installed (pip install "transformers>=5.23,<6", in the dev extra)'
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell, after one warm-up call")
    parser.add_argument("--lengths", default="512,2048,8192", help="comma-separated sequence lengths")
    parser.add_argument("--skip-slow", action="store_true", help="skip the reference and hf cells")
    parser.add_argument("--gpu-lengths", default="2048,8192", help="lengths for the GPU comparison")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU comparison even with a CUDA device")
    parser.add_argument("--cell-timeout", type=float, default=3600, help="seconds allowed per cell")
    parser.add_argument("--cell", choices=CELLS, help=argparse.SUPPRESS)  # internal: run one cell, print its JSON
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    torch.set_num_threads(args.threads)

    if args.cell is not None:
        if args.length is None:
            parser.error("--cell needs --length")
        try:
            result = run_cell(args.cell, args.length, args.repeats, args.device, args.backend)
        except Exception as exc:  # the parent reports the reason and a null cell
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}))
            raise
        print(json.dumps(result))
        return

    lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
    print(
        f"threads: {torch.get_num_threads()} (torch intra-op, --threads; OMP_NUM_THREADS={args.threads} in each "
        f"cell); batch {BATCH}, d_model {D_MODEL}, d_state {D_STATE}, expand {EXPAND}, 1 layer, float32, "
        f"forward + backward, median of {args.repeats} after 1 warm-up",
        file=sys.stderr,
    )
    hf_missing = _hf_missing()
    cpu: dict[str, dict[str, Any]] = {}
    cells: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for length in lengths:
        row: dict[str, Any] = {}
        for name in CELLS:
            if name in SLOW and length > SLOW_MAX_LENGTH:
                continue
            key = f"{length}/{name}"
            if name in SLOW and args.skip_slow:
                result: dict[str, Any] = {"error": "skipped (--skip-slow)"}
            elif name == "hf" and hf_missing:
                result = {"error": hf_missing}
            else:
                result = measure(name, length, args, backend=CELL_BACKEND.get(name))
            cells[key] = result
            if "error" in result:
                skipped[key] = result["error"]
                print(f"L={length} {name}: null ({result['error']})", file=sys.stderr)
            row[f"{name}_s"] = result.get("seconds")
            row[f"{name}_mb"] = result.get("peak_mb")
            row[f"{name}_cpu_s"] = result.get("cpu_seconds")
            row[f"{name}_tokens_per_s"] = result.get("tokens_per_s")
        cpu[str(length)] = row

    ratios: dict[str, dict[str, float | None]] = {}
    print(f"\nforward + backward, batch {BATCH}, {torch.get_num_threads()} thread(s):", file=sys.stderr)
    for length, row in cpu.items():
        line = ", ".join(
            f"{name} {_fmt(row.get(f'{name}_s'), 's')} / {_fmt(row.get(f'{name}_mb'), 'MB')}"
            for name in CELLS
            if f"{name}_s" in row
        )
        ratios[length] = {
            "reference_over_ours": _ratio(row.get("reference_s"), row.get("ours_s")),
            "hf_over_ours": _ratio(row.get("hf_s"), row.get("ours_s")),
            "ours_over_transformer": _ratio(row.get("ours_s"), row.get("transformer_s")),
        }
        shown = ", ".join(f"{k.replace('_over_', '/')} {v:.2f}×" for k, v in ratios[length].items() if v is not None)
        print(f"  L={length}: {line}", file=sys.stderr)
        if shown:
            print(f"    ratios: {shown}", file=sys.stderr)

    gpu: dict[str, Any] | None = None
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = {"device": torch.cuda.get_device_name(0)}
        print(f"\nGPU ({gpu['device']}), ours, forward + backward, float32:", file=sys.stderr)
        for length in [int(v) for v in args.gpu_lengths.split(",") if v.strip()]:
            row = {}
            for backend in ("cuda", "torch"):
                result = measure("ours", length, args, device="cuda", backend=backend)
                cells[f"gpu/{length}/{backend}"] = result
                if "error" in result:
                    row[f"{backend}_error"] = result["error"]
                row[f"{backend}_s"] = result.get("seconds")
                row[f"{backend}_mb"] = result.get("peak_mb")
                row[f"{backend}_tokens_per_s"] = result.get("tokens_per_s")
            row["torch_over_cuda"] = _ratio(row["torch_s"], row["cuda_s"])
            gpu[str(length)] = row
            print(
                f"  L={length}: cuda kernels {_fmt(row['cuda_s'], 's')} / {_fmt(row['cuda_mb'], 'MB')}, "
                f"torch scan {_fmt(row['torch_s'], 's')} / {_fmt(row['torch_mb'], 'MB')}"
                + (f", torch/cuda {row['torch_over_cuda']:.1f}×" if row["torch_over_cuda"] else ""),
                file=sys.stderr,
            )

    params = {name: next((c["params"] for k, c in cells.items() if k.endswith(f"/{name}") and "params" in c), None)
              for name in CELLS}  # fmt: skip
    hf_version = next((c["transformers"] for c in cells.values() if "transformers" in c), None)
    if hf_version is None and not hf_missing:
        import importlib.metadata

        hf_version = importlib.metadata.version("transformers")
    print(
        json.dumps(
            {
                "cpu": cpu,
                "threads": args.threads,
                "batch": BATCH,
                "d_model": D_MODEL,
                "d_state": D_STATE,
                "expand": EXPAND,
                "layers": 1,
                "dtype": "float32",
                "repeats": args.repeats,
                "measure": "fwd+bwd wall s, median after 1 warm-up; *_mb: peak RSS delta MB (gpu: CUDA allocated)",
                "ratios": ratios,
                "params": params,
                "transformers": hf_version,
                "torch": torch.__version__,
                "skipped": skipped,
                "gpu": gpu,
            }
        )
    )


if __name__ == "__main__":
    main()
