# EfficientLLM image for both the web app and the GPU worker (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EFFICIENTLLM_DATA=/data

WORKDIR /srv/efficientllm

# torch first (a CUDA build from PyPI), so the project's "torch>=..." is already satisfied
RUN pip install "torch>=2.4"

COPY pyproject.toml ./
COPY efficientllm ./efficientllm
COPY db ./db
COPY worker ./worker
COPY app ./app
RUN pip install ".[app,worker,data]" && pip install flower  # flower: the "monitoring" profile

RUN useradd --create-home --uid 1000 efficientllm \
    && mkdir -p /data && chown efficientllm:efficientllm /data
USER efficientllm
VOLUME ["/data"]
EXPOSE 7860

CMD ["python", "-m", "worker"]
