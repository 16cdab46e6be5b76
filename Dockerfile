# Production image: CUDA base, the package installed, `lalora` as entry point.
#   docker build -t lalora .
#   docker run --gpus all -v $PWD/runs:/app/runs lalora run configs/demo.yaml --out runs/demo
# The same image runs the MLflow and Prefect servers of docker-compose.yml (entrypoint mlflow / prefect).
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false TORCH_EXTENSIONS_DIR=/app/.cache/torch_extensions
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY lalora lalora
COPY pipelines pipelines
COPY flows flows
COPY configs configs
# GPU torch (the lock's torch version is the Makefile's; a CUDA build of it) from the CUDA wheel index; the
# rest exactly as tested: constraints.txt
RUN python3.11 -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130 \
    && python3.11 -m pip install -c constraints.txt '.[server]'
ENTRYPOINT ["lalora"]
CMD ["--help"]
