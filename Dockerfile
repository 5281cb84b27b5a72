# One image for the API and the worker (docker-compose.yml picks the command).
# Every package at the version requirements.lock pins (scripts/lock refreshes it). The torch wheel
# from PyPI runs on CPU and on NVIDIA GPUs. For a smaller CPU-only image, build with
# --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> (its "+cpu" builds of the same releases).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    SSD_DATA_DIR=/data

WORKDIR /srv

# torch first, in its own layer: it is by far the largest and changes least often.
COPY requirements.lock ./
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} --constraint requirements.lock torch torchvision

COPY pyproject.toml README* ./
COPY model ./model
COPY core ./core
COPY worker ./worker
COPY app ./app
# The onnx extra: GET /jobs/{id}/model.onnx exports a trained model.
RUN pip install --constraint requirements.lock ".[onnx]"

RUN useradd --create-home --uid 1000 ssd && mkdir -p /data && chown ssd:ssd /data
USER ssd
VOLUME ["/data"]
EXPOSE 8000

CMD ["python", "-m", "app"]
