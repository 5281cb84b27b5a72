#!/usr/bin/env bash
# The GPU session in one call: CUDA correctness checks, the throughput benchmark against
# torchvision, and the synthetic-shapes sanity run. Writes logs and JSON to $OUT (or ./gpu-out).
# Expects pycocotools wheels in .whl/ when the machine lacks it.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ! python3 -c "import pycocotools" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 90 python3 bench/cuda_check.py 2>&1 | tee "$OUT/cuda_check.log"
timeout 200 python3 bench/bench_model.py --json "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.log"
timeout 260 python3 bench/train_shapes.py --train-images 2000 --test-images 300 --epochs 30 --batch-size 32 \
  --num-workers 14 --max-seconds 170 --out /tmp/shapes 2>&1 | tee "$OUT/train_shapes.log"
cp /tmp/shapes/summary.json "$OUT/train_shapes_summary.json" 2>/dev/null
cp /tmp/shapes/run/losses.png "$OUT/train_shapes_losses.png" 2>/dev/null
echo done
