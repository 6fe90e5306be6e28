# syntax=docker/dockerfile:1
#
# odyssey-batch GPU trainer image: torch 2.13.0 (CUDA 13) + the mamba-ssm and causal-conv1d CUDA
# kernels compiled from source for the GPU architectures in GPU_ARCHS, + odyssey-batch with its `airflow`
# and `gpu` extras. Build from the repository root (docker compose does this for `trainer` and for
# `airflow-worker-gpu`, the Celery worker of Airflow's `gpu` queue; both profile `gpu`):
#
#   docker build -f infra/trainer.Dockerfile -t odyssey-batch-trainer:local .
#   docker build -f infra/trainer.Dockerfile --build-arg GPU_ARCHS=90,100 ...     # + Blackwell
#
# The build needs no GPU; running it needs an NVIDIA driver recent enough for CUDA 13.0 and the NVIDIA
# Container Toolkit on the host.
#
# Why the base is a CUDA 13.0 *devel* image: the PyPI build of torch==2.13.0 is a CUDA 13.0 build, and
# the kernels are compiled with the image's nvcc, whose major version must match torch's CUDA major
# version (checked below; a 12.x nvcc against a cu130 torch fails). Ubuntu 24.04 because its glibc (2.39)
# runs the CPython 3.11 copied from the official python:3.11 image (built on Debian 12, glibc 2.36):
# Ubuntu 24.04 itself ships 3.12, and the project requires 3.11.
#
# How the kernels are built (facts from the project's shared/docs/mamba-kernels.md, §2, for
# mamba-ssm 2.3.2.post1 and causal-conv1d 1.7.0):
#   * MAMBA_FORCE_BUILD=TRUE / CAUSAL_CONV1D_FORCE_BUILD=TRUE: skip setup.py's probe for a prebuilt
#     wheel (it aborts on any network error other than HTTP 404) and always compile.
#   * --no-build-isolation: the build must see the torch installed here; with isolation pip puts a
#     different torch in a throw-away environment (CUDA-mismatch and undefined-symbol failures).
#   * TORCH_CUDA_ARCH_LIST is ignored by both setup.py files: they pass a hard-coded -gencode list
#     (nine architectures with nvcc 13: sm_75 ... sm_121), and torch adds no arch flags of its own when a
#     flag contains "arch". CUDA 13 nvcc also miscompiles causal-conv1d's sm_103 cubin. So the compiler
#     is wrapped (PYTORCH_NVCC, read by torch's ninja build) to replace that list with GPU_ARCHS, and the
#     built libraries are checked to contain exactly those architectures. The doc's alternative is a
#     setup.py edit; the wrapper needs no knowledge of setup.py's layout.
#   * MAX_JOBS: parallel ninja jobs (ninja must be installed, or the build is serial). NVCC_THREADS is
#     not read, and nvcc's hard-coded --threads 4 does nothing for a single-architecture build.
#   * selective_scan_cuda is compiled by default in 2.3.2.post1 and needs no opt-in. Releases after it
#     (upstream PR #977) compile nothing unless MAMBA_KEEP_CUDA_BUILD=TRUE, so it is set too (2.3.2.post1
#     ignores it). Without selective_scan_cuda, nothing in mamba_ssm imports.
#   * Compile time (doc §2.8): measured per file with nvcc 13.0 for sm_90 only, e.g. causal_conv1d_bwd.cu
#     362 s CPU and 3.4 GB RAM (the critical path), selective_scan_fwd_fp32.cu 56 s; whole build
#     estimated from those at ~25-35 CPU-min, ~6-8 min wall on 16 cores with MAX_JOBS >= 10 and both
#     packages built in parallel (as below). All nine default architectures: ~3-5 CPU-hours, ~20-40 min
#     wall. Not yet timed end to end on a GPU host. The layers are cached, so only a change of torch,
#     CUDA, GPU_ARCHS or the kernel versions compiles again.
#   * The wheels are valid only for this exact image (torch 2.13.0 + CUDA 13, CPython 3.11, C++ ABI).
#     Export them with:
#       docker build -f infra/trainer.Dockerfile --target kernel-wheels --output type=local,dest=wheels .

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Keep TORCH_VERSION equal to the torch pin in pyproject.toml (a mismatch fails the project install).
ARG TORCH_VERSION=2.13.0
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG CAUSAL_CONV1D_VERSION=1.7.0
# Compute capabilities without the dot: 90 = H100/H200 (sm_90), 100 = B200, 80 = A100. Comma-separated.
ARG GPU_ARCHS=90

FROM ${PYTHON_IMAGE} AS python

# ------------------------------------------------------------------------------------------------ base
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS base

# Optional pip index serving a CUDA 13 build of torch==2.13.0 (e.g. a hospital mirror of PyTorch's
# CUDA 13.0 wheel index). Empty = the default index, whose Linux wheel is a CUDA 13.0 build.
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION
ARG DEBIAN_FRONTEND=noninteractive

ENV LANG=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    CUDA_HOME=/usr/local/cuda

# g++ for the kernel build; the shared libraries CPython's extension modules link against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        build-essential ca-certificates tzdata \
        libssl3t64 libffi8 libsqlite3-0 libbz2-1.0 liblzma5 zlib1g libuuid1 libexpat1 \
        libncursesw6 libreadline8t64 libgdbm6t64 libgdbm-compat4t64 \
 && rm -rf /var/lib/apt/lists/*

# CPython 3.11 from the official image (interpreter, shared libpython, stdlib, headers for the build).
COPY --from=python /usr/local/bin/ /usr/local/bin/
COPY --from=python /usr/local/lib/ /usr/local/lib/
COPY --from=python /usr/local/include/ /usr/local/include/
RUN ldconfig \
 && python3.11 -c "import ssl, sqlite3, ctypes, lzma, bz2, zlib, uuid, pyexpat, hashlib, decimal; print(ssl.OPENSSL_VERSION)"

# torch first (the kernels compile against it), then ninja (parallel compile), einops and wheel (imported
# by mamba-ssm's setup.py) at the versions the kernel doc used.
RUN python3.11 -m venv /opt/odyssey
ENV PATH=/opt/odyssey/bin:$PATH
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip setuptools \
 && if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi \
 && pip install packaging "ninja==1.13.2" "einops==0.8.2" "wheel==0.48.0"

# torch must be a CUDA build whose major version matches nvcc's (torch's extension builder refuses a
# major mismatch). Checked without a GPU.
RUN python - <<'EOF'
import re
import subprocess

import torch

out = subprocess.run(["nvcc", "--version"], check=True, capture_output=True, text=True).stdout
nvcc = re.search(r"release (\d+)\.(\d+)", out)
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}; nvcc {nvcc.group(1)}.{nvcc.group(2)}")
if torch.version.cuda is None:
    raise SystemExit("torch is a CPU-only build: TORCH_INDEX_URL must serve a CUDA 13 build")
if torch.version.cuda.split(".")[0] != nvcc.group(1):
    raise SystemExit(f"torch CUDA {torch.version.cuda} and nvcc {nvcc.group(0)} differ in major version: "
                     "change CUDA_VERSION or TORCH_INDEX_URL")
EOF

# --------------------------------------------------------------------------------------------- kernels
FROM base AS kernels

ARG MAMBA_SSM_VERSION
ARG CAUSAL_CONV1D_VERSION
ARG GPU_ARCHS
ARG MAX_JOBS=10

ENV MAMBA_FORCE_BUILD=TRUE \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    MAMBA_KEEP_CUDA_BUILD=TRUE \
    PYTORCH_NVCC=/usr/local/bin/nvcc-gencode \
    NVCC_GENCODE_LOG=/tmp/nvcc-gencode.log

# nvcc with the -gencode/-arch flags replaced by one -gencode pair per GPU_ARCHS entry.
COPY --chmod=0755 <<'EOF' /usr/local/bin/nvcc-gencode
#!/bin/bash
set -euo pipefail
args=()
skip=0
for a in "$@"; do
    if (( skip )); then skip=0; continue; fi
    case "$a" in
        -gencode|--generate-code|-arch|--gpu-architecture|-code|--gpu-code) skip=1 ;;
        -gencode=*|--generate-code=*|-arch=*|--gpu-architecture=*|-code=*|--gpu-code=*|arch=compute_*) ;;
        *) args+=("$a") ;;
    esac
done
IFS=',' read -ra archs <<< "${GPU_ARCHS:?GPU_ARCHS is not set}"
for arch in "${archs[@]}"; do
    args+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done
echo "nvcc-gencode: GPU_ARCHS=${GPU_ARCHS}" >> "${NVCC_GENCODE_LOG:-/dev/null}"
exec "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" "${args[@]}"
EOF

# The two packages compile in parallel, each with MAX_JOBS ninja jobs. --no-binary: never take a
# prebuilt wheel compiled against another torch. --no-cache-dir: pip's wheel cache is keyed by the sdist,
# not by GPU_ARCHS or torch, so a cached build could be reused for the wrong ones. (The script runs
# under bash, per its first line.)
# hadolint ignore=SC3011,DL4006
RUN <<'EOF'
#!/bin/bash
set -euo pipefail
start=$(date +%s)
pip wheel --no-cache-dir --no-deps --no-build-isolation --no-binary causal-conv1d -w /wheels \
    "causal-conv1d==${CAUSAL_CONV1D_VERSION}" > /tmp/causal-conv1d-build.log 2>&1 &
conv=$!
pip wheel --no-cache-dir --no-deps --no-build-isolation --no-binary mamba-ssm -w /wheels \
    "mamba-ssm==${MAMBA_SSM_VERSION}" > /tmp/mamba-ssm-build.log 2>&1 &
mamba=$!
status=0
wait "$conv" || { status=1; tail -n 80 /tmp/causal-conv1d-build.log; }
wait "$mamba" || { status=1; tail -n 80 /tmp/mamba-ssm-build.log; }
[ "$status" -eq 0 ] || { echo "kernel build failed (logs above)"; exit 1; }
echo "mamba-ssm ${MAMBA_SSM_VERSION} + causal-conv1d ${CAUSAL_CONV1D_VERSION} for GPU_ARCHS=${GPU_ARCHS}," \
     "MAX_JOBS=${MAX_JOBS}: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
ls -l /wheels

# Fail loudly if the compiler wrapper was bypassed (the build would silently target nine architectures).
test -s "${NVCC_GENCODE_LOG}" || { echo "nvcc-gencode was never called: PYTORCH_NVCC not honoured"; exit 1; }
if command -v cuobjdump >/dev/null; then
    want=$(tr ',' '\n' <<< "${GPU_ARCHS}" | sed 's/^/sm_/' | sort -u | xargs)
    mkdir -p /tmp/unpacked
    for whl in /wheels/*.whl; do python -m zipfile -e "$whl" /tmp/unpacked; done
    for so in /tmp/unpacked/*_cuda*.so; do
        have=$(cuobjdump --list-elf "$so" | grep -o 'sm_[0-9]*[a-z]*' | sort -u | xargs || true)
        echo "$(basename "$so"): ${have}"
        [ "$have" = "$want" ] || { echo "expected cubins for: ${want}"; exit 1; }
    done
else
    echo "cuobjdump not in this image: architecture check skipped"
fi

# The extensions must load against this torch (no GPU needed for that).
pip install --no-cache-dir --no-deps /wheels/*.whl
python -c "import torch, selective_scan_cuda, causal_conv1d_cuda; print('kernels load')"
EOF

# `--target kernel-wheels --output type=local,dest=wheels` exports just the wheels.
FROM scratch AS kernel-wheels
COPY --from=kernels /wheels/ /

# --------------------------------------------------------------------------------------------- trainer
FROM base AS trainer

ARG TORCH_VERSION
ARG MAMBA_SSM_VERSION
ARG CAUSAL_CONV1D_VERSION
# Recorded in the environment for odyssey-gpu-check's report.
ARG GPU_ARCHS
ARG ODYSSEY_UID=10001
# As in infra/Dockerfile: the Celery provider, for airflow-worker-gpu (CeleryExecutor, queue `gpu`).
ARG AIRFLOW_CELERY_PROVIDER="apache-airflow-providers-celery>=3.26,<4"

COPY --from=kernels /wheels/ /opt/odyssey-wheels/
RUN printf 'torch==%s\nmamba-ssm==%s\ncausal-conv1d==%s\n' \
        "${TORCH_VERSION}" "${MAMBA_SSM_VERSION}" "${CAUSAL_CONV1D_VERSION}" > /opt/odyssey-wheels/constraints.txt

# The project with its `airflow` and `gpu` extras (Airflow: this image also runs the Celery worker of the `gpu`
# queue), in steps like infra/Dockerfile: dependencies from pyproject.toml alone (placeholder package), the
# Celery provider, then the source. mamba-ssm and causal-conv1d come only from the wheels built above
# (--only-binary + constraints: a newer sdist on the index is never compiled here). Their other requirements
# (transformers, triton, tilelang, quack-kernels, ...) come from the index. Resolved together with
# apache-airflow 3.3.x without conflicts (pip's resolver, checked without building).
WORKDIR /src
# README.md is the package long description (pyproject `readme`); the wildcard tolerates its absence.
COPY pyproject.toml constraints.txt README.m[d] ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p odyssey_batch \
 && touch odyssey_batch/__init__.py \
 && pip install --find-links /opt/odyssey-wheels --only-binary mamba-ssm,causal-conv1d \
        --constraint /opt/odyssey-wheels/constraints.txt --constraint constraints.txt ".[airflow,gpu]" \
 && rm -rf odyssey_batch build ./*.egg-info

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --constraint /opt/odyssey-wheels/constraints.txt --constraint constraints.txt "${AIRFLOW_CELERY_PROVIDER}"

COPY sql/ ./sql/
COPY odyssey_batch/ ./odyssey_batch/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --find-links /opt/odyssey-wheels --only-binary mamba-ssm,causal-conv1d \
        --constraint /opt/odyssey-wheels/constraints.txt --constraint constraints.txt ".[airflow,gpu]" \
 && pip check \
 && python -c "import torch, selective_scan_cuda, causal_conv1d_cuda" \
 && odyssey-batch --version \
 && airflow version

# GPU self-check, the container's default command: torch sees a GPU, and the compiled kernels run on it
# and agree with mamba-ssm's / causal-conv1d's pure-PyTorch references.
COPY --chmod=0755 <<'EOF' /usr/local/bin/odyssey-gpu-check
#!/opt/odyssey/bin/python
"""Check that this trainer container can use its GPU with the mamba-ssm and causal-conv1d kernels."""

import os
import sys

import torch

print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
if not torch.cuda.is_available():
    sys.exit("odyssey-gpu-check: no GPU visible. Start the trainer with `docker compose --profile gpu ...` on a "
             "host with an NVIDIA driver for CUDA 13 and the NVIDIA Container Toolkit.")
major, minor = torch.cuda.get_device_capability(0)
print(f"GPU 0: {torch.cuda.get_device_name(0)} (sm_{major}{minor}); "
      f"kernels built for GPU_ARCHS={os.environ.get('GPU_ARCHS')}")

try:
    from causal_conv1d import causal_conv1d_fn
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref

    torch.manual_seed(0)
    batch, dim, length, state = 2, 64, 256, 16
    dev = "cuda"
    u = torch.randn(batch, dim, length, device=dev)
    delta = torch.rand(batch, dim, length, device=dev) * 0.1
    A = -torch.rand(dim, state, device=dev)
    B = torch.randn(batch, state, length, device=dev)
    C = torch.randn(batch, state, length, device=dev)
    D = torch.randn(dim, device=dev)
    weight, bias = torch.randn(dim, 4, device=dev), torch.randn(dim, device=dev)

    def rel_err(out, ref):
        return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()

    scan_err = rel_err(selective_scan_fn(u, delta, A, B, C, D), selective_scan_ref(u, delta, A, B, C, D))
    conv_err = rel_err(causal_conv1d_fn(u, weight, bias, activation="silu"),
                       causal_conv1d_ref(u, weight, bias, activation="silu"))
    torch.cuda.synchronize()
except Exception as exc:  # e.g. "no kernel image is available": GPU not in GPU_ARCHS
    sys.exit(f"odyssey-gpu-check: CUDA kernels failed: {type(exc).__name__}: {exc}")

print(f"relative max error vs the PyTorch references: selective_scan_fn {scan_err:.1e}, "
      f"causal_conv1d_fn {conv_err:.1e}")
if scan_err > 1e-3 or conv_err > 1e-3:
    sys.exit("odyssey-gpu-check: kernel output differs from the reference")
print("odyssey-gpu-check: OK")
EOF

ENV PYTHONUNBUFFERED=1 \
    ODYSSEY_HOME=/var/lib/odyssey \
    AIRFLOW_HOME=/opt/airflow \
    GX_ANALYTICS_ENABLED=false \
    GPU_ARCHS=${GPU_ARCHS}

# /opt/airflow as in infra/Dockerfile (airflow-worker-gpu mounts dags/ and the logs volume there).
RUN groupadd --system --gid "${ODYSSEY_UID}" odyssey \
 && useradd --system --uid "${ODYSSEY_UID}" --gid odyssey --home-dir /var/lib/odyssey \
            --shell /usr/sbin/nologin odyssey \
 && install -d -o odyssey -g odyssey -m 0750 /var/lib/odyssey \
 && install -d -o odyssey -g odyssey -m 0750 /opt/airflow /opt/airflow/dags /opt/airflow/logs

# Numeric, so that platforms enforcing "run as non-root" can verify it.
USER ${ODYSSEY_UID}:${ODYSSEY_UID}
WORKDIR /var/lib/odyssey
VOLUME ["/var/lib/odyssey"]

CMD ["odyssey-gpu-check"]
